// loyaltysync on Azure: Function App (Flex Consumption, system-assigned managed identity), storage reached with
// that identity (no keys), Application Insights on a Log Analytics workspace, the operations workbook and alert rules.
//
//   az deployment group create -g <resource group> -f infra/main.bicep -p infra/main.parameters.json \
//     -p telemetryHashSalt=<secret, generated once and kept>
//   func azure functionapp publish <functionAppName output>
//
// Settings the app reads are documented in README.md (Configuration) and docs/monitoring.md.

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

@description('Most instances Flex Consumption may scale out to. Dataverse service protection, not compute, is what binds (README, Scale-out).')
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

@description('Where alert notifications go; empty: the alert rules fire without notifying anyone.')
param alertEmail string = ''

@description('Days Log Analytics keeps telemetry.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

var deploymentContainerName = 'app-package'
var actionGroupName = '${appName}-operators'
// Built-in roles the host and the app need on the storage account (azure-functions.md §5).
var storageRoles = {
  blobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // host storage, deployment package
  queueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88' // queue output binding, enqueue, pause re-queue
  queueDataMessageProcessor: '8a0f0c08-91a1-4084-bc3d-661d67233fed' // queue triggers
  tableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // sync state, dead letters, control; host diagnostics
}

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

// Every setting here is one the app (loyaltysync/settings.py) or the Functions host reads; tests/test_infra.py checks it.
var appSettings = {
  FNO_URL: fnoUrl
  DATAVERSE_URL: dataverseUrl
  LOYALTYSYNC_CREDENTIAL: 'managed-identity'
  INTEGRATION_USER_IDS: integrationUserIds
  AzureWebJobsStorage__accountName: storage.name
  AzureWebJobsStorage__credential: 'managedidentity'
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME: 'loyaltysync'
  REDACT_PERSONAL_DATA: string(redactPersonalData)
  TELEMETRY_HASH_SALT: telemetryHashSalt
}

// The worker's own OpenTelemetry set-up: without these, the app configures the distro itself.
var workerTelemetrySettings = {
  PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'
  // The distro's storage and urllib instrumentations would show RowKeys (natural keys) in dependency URLs.
  OTEL_PYTHON_DISABLED_INSTRUMENTATIONS: 'azure_sdk,requests,urllib,urllib3'
}

resource functionAppSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: union(appSettings, workerOpenTelemetry ? workerTelemetrySettings : {})
  // The host connects to storage with its identity as soon as it has settings: give it the roles first.
  dependsOn: [
    storageRoleAssignments
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
output workspaceName string = workspace.name
