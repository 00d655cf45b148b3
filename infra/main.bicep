// loyaltysync on Azure: Function App (Flex Consumption, system-assigned managed identity), storage reached with
// that identity (no keys), Application Insights on a Log Analytics workspace taking telemetry from that identity
// (Microsoft Entra ID; local auth off by default), the operations workbook and alert rules. Optional: a Service Bus
// queue and an Event Grid topic for F&O business events.
//
//   az deployment group create -g <resource group> -f infra/main.bicep -p infra/main.parameters.json \
//     -p telemetryHashSalt=<secret, generated once and kept>
//   func azure functionapp publish <functionAppName output>
//
// Settings the app reads are documented in docs/configuration.md and docs/monitoring.md.

targetScope = 'resourceGroup'

@description('Function App name (also names the plan, Application Insights and the workspace).')
@minLength(2)
@maxLength(40)
param appName string = 'loyaltysync-${uniqueString(resourceGroup().id)}'

@description('Azure region of every resource.')
param location string = resourceGroup().location

@description('F&O environment root, e.g. https://contoso.operations.dynamics.com (FNO_URL).')
param fnoUrl string

@description('Dataverse environment root, e.g. https://contoso.crm.dynamics.com (DATAVERSE_URL).')
param dataverseUrl string

@description('Dataverse systemuserid of the app user and the identity object id, comma-separated (INTEGRATION_USER_IDS). Known after the application user is created: deploy again with it.')
param integrationUserIds string = ''

@description('Storage account for queues, tables and the deployment package (3-24 lower-case letters and digits).')
@minLength(3)
@maxLength(24)
param storageAccountName string = 'st${uniqueString(resourceGroup().id, appName)}'

@description('Python version of the Flex Consumption runtime.')
@allowed([
  '3.10'
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@description('Most instances Flex Consumption may scale out to. Dataverse service protection, not compute, is what binds (docs/design.md, Scale-out).')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory per instance.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Hash card and party numbers in telemetry (REDACT_PERSONAL_DATA).')
param redactPersonalData bool = true

@description('Per-deployment secret salt of those hashes (TELEMETRY_HASH_SALT). Generate once, keep it: a new salt changes every hash.')
@secure()
param telemetryHashSalt string

@description('true: the Functions worker configures OpenTelemetry (also add "telemetryMode": "OpenTelemetry" to host.json); false: the app does (docs/monitoring.md).')
param workerOpenTelemetry bool = false

@description('Application Insights takes telemetry only from Microsoft Entra identities (DisableLocalAuth): the app and the host send with the managed identity (Monitoring Metrics Publisher role, APPLICATIONINSIGHTS_AUTHENTICATION_STRING). false: the connection string alone may also send.')
param entraOnlyIngestion bool = true

@description('Name of a Service Bus queue for F&O business events (SERVICEBUS_QUEUE): deploys a namespace, the queue, a send-only rule for F&O and the app\'s receive role. Empty: no Service Bus.')
param serviceBusQueueName string = ''

@description('Deploy an Event Grid topic for F&O business events, subscribed to the fo_eventgrid function (EVENTGRID_ENABLED). The subscription needs that function to exist: deploy and publish the code first with false, then deploy again with true.')
param eventGridTopic bool = false

@description('Where alert notifications go; empty: the alert rules fire without notifying anyone.')
param alertEmail string = ''

@description('Days Log Analytics keeps telemetry.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

var deploymentContainerName = 'app-package'
var serviceBusNamespaceName = '${appName}-bus'
var useServiceBus = !empty(serviceBusQueueName)
var actionGroupName = '${appName}-operators'
// Built-in roles the host and the app need on the storage account (azure-functions.md §5).
var storageRoles = {
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // host storage, deployment package
  queueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88' // queue output binding, enqueue, pause re-queue
  queueDataMessageProcessor: '8a0f0c08-91a1-4084-bc3d-661d67233fed' // queue triggers
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // sync state, dead letters, control; host diagnostics
}
// Built-in roles on the other resources.
var monitoringMetricsPublisherRole = '3913510d-42f4-4e42-8a64-420c390055eb' // Application Insights ingestion (all telemetry)
var serviceBusDataReceiverRole = '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0' // the fo_servicebus queue trigger

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${appName}-logs'
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${appName}-insights'
  location: location
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    IngestionMode: 'LogAnalytics'
    DisableLocalAuth: entraOnlyIngestion
  }
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false // identity-based connections only
    supportsHttpsTrafficOnly: true
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: '${appName}-plan'
  location: location
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: appName
  location: location
  kind: 'functionapp,linux'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'SystemAssignedIdentity'
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
  dependsOn: [
    deploymentContainer
  ]
}

resource storageRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in items(storageRoles): {
    name: guid(storage.id, functionApp.id, role.value)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role.value)
      principalId: functionApp.identity.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

// The identity may send telemetry: required with DisableLocalAuth, used either way (docs/monitoring.md).
resource appInsightsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, functionApp.id, monitoringMetricsPublisherRole)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRole)
    principalId: functionApp.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// Optional: F&O business events on a Service Bus queue. F&O's business event endpoint sends with a connection
// string it reads from Key Vault, so the namespace keeps SAS for that one send-only rule; the app receives with
// its identity.
resource serviceBus 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = if (useServiceBus) {
  name: serviceBusNamespaceName
  location: location
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    minimumTlsVersion: '1.2'
  }
}

resource serviceBusQueue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' = if (useServiceBus) {
  parent: serviceBus
  name: useServiceBus ? serviceBusQueueName : 'unused'
  properties: {
    maxDeliveryCount: 10
    deadLetteringOnMessageExpiration: true
  }
}

resource serviceBusSendRule 'Microsoft.ServiceBus/namespaces/queues/authorizationRules@2022-10-01-preview' = if (useServiceBus) {
  parent: serviceBusQueue
  name: 'fo-business-events'
  properties: {
    rights: [
      'Send'
    ]
  }
}

resource serviceBusReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (useServiceBus) {
  name: guid(resourceGroup().id, serviceBusNamespaceName, serviceBusQueueName, functionApp.id, serviceBusDataReceiverRole)
  scope: serviceBusQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', serviceBusDataReceiverRole)
    principalId: functionApp.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// Every setting here is one the app (loyaltysync/settings.py) or the Functions host reads; tests/test_infra.py checks it.
var appSettings = {
  FNO_URL: fnoUrl
  DATAVERSE_URL: dataverseUrl
  LOYALTYSYNC_CREDENTIAL: 'managed-identity'
  INTEGRATION_USER_IDS: integrationUserIds
  AzureWebJobsStorage__accountName: storage.name
  AzureWebJobsStorage__credential: 'managedidentity'
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  // Telemetry sent with the system-assigned identity's token, by the host and by the app (docs/monitoring.md).
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD'
  PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME: 'loyaltysync'
  // Every trace kept (the distro's default keeps 5 a second): queries count exactly. Lower the ratio to sample.
  OTEL_TRACES_SAMPLER: 'microsoft.fixed_percentage'
  OTEL_TRACES_SAMPLER_ARG: '1.0'
  REDACT_PERSONAL_DATA: string(redactPersonalData)
  TELEMETRY_HASH_SALT: telemetryHashSalt
}

// The worker's own OpenTelemetry set-up: without these, the app configures the distro itself.
var workerTelemetrySettings = {
  PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'
  // All of the distro's instrumentations: ours are the only spans (httpx's would repeat the F&O and Dataverse
  // calls with the key in the URL, azure-core's show storage RowKeys). The app switches the URL ones off anyway.
  OTEL_PYTHON_DISABLED_INSTRUMENTATIONS: 'azure_sdk,django,fastapi,flask,httpx,httpx2,psycopg2,requests,urllib,urllib3'
}

// With serviceBusQueueName: the fo_servicebus trigger's identity-based connection (prefix SERVICEBUS).
var serviceBusSettings = {
  SERVICEBUS__fullyQualifiedNamespace: '${serviceBusNamespaceName}.servicebus.windows.net'
  SERVICEBUS_QUEUE: serviceBusQueueName
}

// With eventGridTopic: registers the fo_eventgrid function.
var eventGridSettings = {
  EVENTGRID_ENABLED: 'true'
}

var optionalSettings = union(workerOpenTelemetry ? workerTelemetrySettings : {}, useServiceBus ? serviceBusSettings : {}, eventGridTopic ? eventGridSettings : {})

resource functionAppSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: union(appSettings, optionalSettings)
  // The host connects to storage and sends telemetry with its identity as soon as it has settings: roles first.
  dependsOn: [
    storageRoleAssignments
    appInsightsPublisher
    serviceBusReceiver
  ]
}

// Optional: F&O business events through Event Grid. F&O publishes with the topic's access key (from Key Vault);
// the subscription delivers to the fo_eventgrid function, which must already be published.
resource eventGrid 'Microsoft.EventGrid/topics@2022-06-15' = if (eventGridTopic) {
  name: '${appName}-events'
  location: location
  properties: {
    inputSchema: 'EventGridSchema'
  }
}

resource eventGridSubscription 'Microsoft.EventGrid/topics/eventSubscriptions@2022-06-15' = if (eventGridTopic) {
  parent: eventGrid
  name: 'loyaltysync'
  properties: {
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        resourceId: '${functionApp.id}/functions/fo_eventgrid'
        maxEventsPerBatch: 1
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
  dependsOn: [
    functionAppSettings
  ]
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, appName, 'loyaltysync-workbook')
  location: location
  kind: 'shared'
  properties: {
    displayName: 'loyaltysync operations'
    category: 'workbook'
    serializedData: loadTextContent('workbook.json')
    sourceId: appInsights.id
  }
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: actionGroupName
  location: 'global'
  properties: {
    groupShortName: 'loyaltysync'
    enabled: true
    emailReceivers: [
      {
        name: 'operators'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var alertActions = {
  actionGroups: empty(alertEmail) ? [] : [
    resourceId('Microsoft.Insights/actionGroups', actionGroupName)
  ]
}

// Thresholds and their reasons: docs/monitoring.md, "Alert rules".
resource deadLetterAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${appName}-dead-letters'
  location: location
  properties: {
    displayName: 'loyaltysync: records parked as dead letters'
    description: 'A record could not be synced and waits for an operator (fix the cause, then loyaltysync replay).'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      workspace.id
    ]
    criteria: {
      allOf: [
        {
          query: '''
AppMetrics
| where Name == "loyaltysync.dead_letters"
| extend template = tostring(Properties.template), direction = tostring(Properties.direction)
| summarize DeadLettered = sum(Sum) by template, direction
'''
          timeAggregation: 'Total'
          metricMeasureColumn: 'DeadLettered'
          dimensions: [
            {
              name: 'template'
              operator: 'Include'
              values: [
                '*'
              ]
            }
            {
              name: 'direction'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: alertActions
  }
  dependsOn: [
    actionGroup
    appInsights
  ]
}

resource backlogAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${appName}-backlog-age'
  location: location
  properties: {
    displayName: 'loyaltysync: changes waiting more than 5 minutes'
    description: 'The oldest queued change of a template that is not paused is older than 5 minutes.'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT10M'
    scopes: [
      workspace.id
    ]
    criteria: {
      allOf: [
        {
          query: '''
let paused = AppMetrics
| where Name == "loyaltysync.template.paused"
| summarize Paused = max(Sum) by template = tostring(Properties.template);
AppMetrics
| where Name == "loyaltysync.queue.oldest_age"
| summarize OldestAgeSeconds = max(Sum) by template = tostring(Properties.template)
| join kind=leftouter paused on template
| where isnull(Paused) or Paused < 1
| project template, OldestAgeSeconds
'''
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'OldestAgeSeconds'
          dimensions: [
            {
              name: 'template'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 300
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: alertActions
  }
  dependsOn: [
    actionGroup
    appInsights
  ]
}

// Retried changes go back on the queue as new messages (docs/retries.md), so an outage does not age
// the backlog: it shows as retries that do not stop. Two 5-minute windows in a row with retries.
resource retryingAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${appName}-retrying'
  location: location
  properties: {
    displayName: 'loyaltysync: changes retried for 10 minutes'
    description: 'Changes of a template have been retried (outage, throttling, 5xx) in two 5-minute windows in a row; they are parked once RETRY_BUDGET_SECONDS have passed.'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    scopes: [
      workspace.id
    ]
    criteria: {
      allOf: [
        {
          query: '''
AppMetrics
| where Name == "loyaltysync.events.retried"
| summarize Retried = sum(Sum) by template = tostring(Properties.template)
'''
          timeAggregation: 'Total'
          metricMeasureColumn: 'Retried'
          dimensions: [
            {
              name: 'template'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 2
            minFailingPeriodsToAlert: 2
          }
        }
      ]
    }
    autoMitigate: true
    actions: alertActions
  }
  dependsOn: [
    actionGroup
    appInsights
  ]
}

resource throttlingAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${appName}-throttling'
  location: location
  properties: {
    displayName: 'loyaltysync: F&O or Dataverse throttling above 10 %'
    description: 'More than a tenth of the calls to a target were answered 429 over 15 minutes (at least 20 calls).'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      workspace.id
    ]
    criteria: {
      allOf: [
        {
          query: '''
AppMetrics
| where Name in ("loyaltysync.target.requests", "loyaltysync.target.throttled")
| extend target = tostring(Properties.target)
| summarize Requests = sumif(Sum, Name endswith "requests"), Throttled = sumif(Sum, Name endswith "throttled") by target
| where Requests >= 20
| extend ThrottledPercent = 100.0 * Throttled / Requests
'''
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'ThrottledPercent'
          dimensions: [
            {
              name: 'target'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 10
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: alertActions
  }
  dependsOn: [
    actionGroup
    appInsights
  ]
}

output functionAppName string = functionApp.name
output functionAppUrl string = 'https://${functionApp.properties.defaultHostName}'
@description('Object id of the app\'s managed identity: map it in F&O (Microsoft Entra applications) and create the Dataverse application user for it.')
output principalId string = functionApp.identity.principalId
output applicationInsightsName string = appInsights.name
@description('Service Bus namespace for F&O\'s business event endpoint (its send-only rule: fo-business-events), or empty.')
output serviceBusNamespace string = useServiceBus ? serviceBusNamespaceName : ''
@description('Event Grid topic endpoint for F&O\'s business event endpoint, or empty.')
output eventGridTopicEndpoint string = eventGridTopic ? eventGrid.properties.endpoint : ''
output workspaceName string = workspace.name
