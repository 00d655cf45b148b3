"""Emulators of the F&O OData service and the Dataverse Web API, and the pieces they share."""
