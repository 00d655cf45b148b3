"""The loyaltysync dev kit: the sandbox (F&O and Dataverse emulators), the dev host, the demo,
the stack runner and the Azurite helper.

It lives beside the product in the repository and never ships: `.funcignore` leaves it out of
the deployed file set, and nothing in `loyaltysync/` or `function_app.py` imports it (a test
over the import graph enforces that). The Makefile installs it into `.venv`.
"""
