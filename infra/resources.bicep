// Every resource of the app, declared here (no registry modules): Flex Consumption plan and app,
// a user-assigned identity, host and model storage without shared keys, monitoring with local
// auth off, a Key Vault for HF_TOKEN only when a token is given, role assignments, the operators'
// alerts and workbook (infra/workbook.json).

param location string
param tags object
param resourceToken string
param principalId string
param principalType string
param instanceMemoryMB int
param maximumInstanceCount int
param alwaysReadyHttpInstances int
param qaMaxConcurrent int
param modelId string
param modelRevision string
param modelRefreshSchedule string
param qaBackend string
param qaQuantize string
@secure()
param hfToken string
param alertEmail string

var functionAppName = 'func-${resourceToken}'
var deploymentContainerName = 'app-package-${take(resourceToken, 12)}'
var modelContainerName = 'models'
var refreshQueueName = 'model-refresh'
var hfTokenSecretName = 'hf-token'
var useKeyVault = !empty(hfToken)
var keyVaultName = 'kv-${take(resourceToken, 20)}'

// Built-in role definitions, by id (https://learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageQueueDataMessageSender: 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
}

// ---------------------------------------------------------------------------------------------
// Identity

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${resourceToken}'
  location: location
  tags: tags
}

// ---------------------------------------------------------------------------------------------
// Storage: the host account (AzureWebJobsStorage: keys, timer and queue state, the refresh queue,
// the deployment package) and the model account (the `models` container). No shared key.

resource hostStorage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:Default network action Allow: Flex Consumption apps without VNet integration reach storage over public endpoints; every request needs an Entra ID token (no shared key).
  // checkov:skip=CKV_AZURE_43:False positive: the name is interpolated (3 letters + uniqueString's 13 lower-case alphanumerics), which checkov cannot evaluate.
  // checkov:skip=CKV_AZURE_206:Locally redundant storage: the host state is rebuilt by the Functions host and the package by azd deploy; ZRS/GRS costs more for nothing to recover.
  // checkov:skip=CKV_AZURE_59:Public network access stays on: Flex Consumption apps without VNet integration reach storage over public endpoints; access is Entra ID only (no shared key) and HTTPS only.
  name: 'sth${resourceToken}'
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: { enabled: true, keyType: 'Account' }
        file: { enabled: true, keyType: 'Account' }
        queue: { enabled: true, keyType: 'Account' }
        table: { enabled: true, keyType: 'Account' }
      }
    }
  }

  resource blobService 'blobServices' = {
    name: 'default'

    // Flex Consumption deployment package (functionAppConfig.deployment.storage).
    resource deploymentContainer 'containers' = {
      name: deploymentContainerName
      properties: { publicAccess: 'None' }
    }
  }

  resource queueService 'queueServices' = {
    name: 'default'

    // The refresh queue (MODEL_REFRESH_QUEUE), created here so a role can be scoped to it.
    resource refreshQueue 'queues' = {
      name: refreshQueueName
    }
  }
}

resource modelStorage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:Default network action Allow: Flex Consumption apps without VNet integration reach storage over public endpoints; every request needs an Entra ID token (no shared key).
  // checkov:skip=CKV_AZURE_43:False positive: the name is interpolated (3 letters + uniqueString's 13 lower-case alphanumerics), which checkov cannot evaluate.
  // checkov:skip=CKV_AZURE_206:Locally redundant storage: every version can be isolated again from the Hub; choose ZRS by editing the sku if an outage matters more than the cost.
  // checkov:skip=CKV_AZURE_59:Public network access stays on: Flex Consumption apps without VNet integration reach storage over public endpoints; access is Entra ID only (no shared key) and HTTPS only.
  name: 'stm${resourceToken}'
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: { enabled: true, keyType: 'Account' }
        file: { enabled: true, keyType: 'Account' }
        queue: { enabled: true, keyType: 'Account' }
        table: { enabled: true, keyType: 'Account' }
      }
    }
  }

  resource blobService 'blobServices' = {
    name: 'default'
    properties: {
      // Versions are immutable and sha256-verified; soft delete lets an operator undo a wrong delete.
      deleteRetentionPolicy: { enabled: true, days: 7 }
      containerDeleteRetentionPolicy: { enabled: true, days: 7 }
    }

    // MODEL_CONTAINER: versions, current.json, refresh.lock, last-refresh.json.
    resource modelContainer 'containers' = {
      name: modelContainerName
      properties: { publicAccess: 'None' }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Monitoring: Log Analytics + workspace-based Application Insights, local (key) auth off.

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-${resourceToken}'
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
    features: { disableLocalAuth: true }
  }
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-${resourceToken}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: true
  }
}

// ---------------------------------------------------------------------------------------------
// Key Vault for HF_TOKEN, only when a token is given (hfToken's description says so; `azd env
// set-secret HF_TOKEN` then `azd provision` adds it later). RBAC only; soft delete on, purge
// protection off (azd down --purge).

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = if (useKeyVault) {
  // checkov:skip=CKV_AZURE_189:Public network access on: Flex Consumption apps without VNet integration resolve Key Vault references over the public endpoint; access is Entra ID RBAC only.
  // checkov:skip=CKV_AZURE_109:Firewall default Allow, for the same reason as CKV_AZURE_189 (no VNet in this template).
  // checkov:skip=CKV_AZURE_110:No purge protection: `azd down --purge` must be able to free the vault name; the vault holds only a Hub token, which can be re-issued.
  // checkov:skip=CKV_AZURE_42:Soft delete is on (7 days); purge protection is off on purpose (see CKV_AZURE_110).
  name: keyVaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }

}

// The token itself, only when one is given.
resource hfTokenSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (useKeyVault) {
  // checkov:skip=CKV_AZURE_41:No expiry: a Hub token's lifetime is set on the Hub; an expiry here would silently break the Key Vault reference. Rotate both together (docs/deploy.md).
  // checkov:skip=CKV_AZURE_114:False positive: contentType is set below; checkov reads a conditional resource's body as {condition, config} and misses it.
  parent: keyVault
  name: hfTokenSecretName
  properties: {
    value: hfToken
    contentType: 'text/plain'
    attributes: { enabled: true }
  }
}

// ---------------------------------------------------------------------------------------------
// Flex Consumption plan and the function app

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Zone redundancy on Flex Consumption depends on the region; set zoneRedundant: true on the plan where the region offers it.
  name: 'plan-${resourceToken}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

// HF_TOKEN as a Key Vault reference, resolved with keyVaultReferenceIdentity (never the secret
// itself); blank when no token is given (settings.py reads blank as none).
var hfTokenReference = useKeyVault ? '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=${hfTokenSecretName})' : ''

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_17:Client certificates would break the anonymous /api/health probe and key-based callers; callers authenticate with function keys over HTTPS.
  // checkov:skip=CKV_AZURE_212:Flex Consumption scales by maximumInstanceCount and always-ready instances, not by a minimum instance count on the site.
  // checkov:skip=CKV_AZURE_222:Public network access stays on: the HTTP API is the product (function keys, HTTPS only); VNet-only access is a template change (docs/deploy.md).
  // checkov:skip=CKV_AZURE_213:No platform health check: /api/health answers 503 until an instance has loaded the model, so the platform would recycle instances that are loading it.
  name: functionAppName
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identity.id}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identity.id
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: [
          // Host storage as an identity-based connection: no AzureWebJobsStorage connection string.
          { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
          { name: 'AzureWebJobsStorage__clientId', value: identity.properties.clientId }
          { name: 'AzureWebJobsStorage__blobServiceUri', value: hostStorage.properties.primaryEndpoints.blob }
          { name: 'AzureWebJobsStorage__queueServiceUri', value: hostStorage.properties.primaryEndpoints.queue }
          // The host keeps its diagnostic events in Table storage (the first clue when a large
          // package fails to start): identity-based too, with Storage Table Data Contributor below.
          { name: 'AzureWebJobsStorage__tableServiceUri', value: hostStorage.properties.primaryEndpoints.table }
          // Model storage through the same identity (DefaultAzureCredential with this client id).
          { name: 'MODEL_STORAGE__blobServiceUri', value: modelStorage.properties.primaryEndpoints.blob }
          { name: 'MODEL_STORAGE__clientId', value: identity.properties.clientId }
          // Telemetry with Entra ID auth (the host's and the app's exporter): the one connection string
          // allowed (it holds no secret).
          { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: applicationInsights.properties.ConnectionString }
          { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'ClientId=${identity.properties.clientId};Authorization=AAD' }
          // The app's settings (shared/settings.py); the others keep their defaults (docs/settings.md).
          { name: 'MODEL_CONTAINER', value: modelContainerName }
          { name: 'MODEL_ID', value: modelId }
          { name: 'MODEL_REVISION', value: modelRevision }
          { name: 'MODEL_REFRESH_SCHEDULE', value: modelRefreshSchedule }
          { name: 'MODEL_REFRESH_QUEUE', value: refreshQueueName }
          { name: 'MODEL_LOAD_MODE', value: 'memory' }
          { name: 'MODEL_RELOAD', value: 'replace' }
          { name: 'QA_BACKEND', value: qaBackend }
          { name: 'QA_QUANTIZE', value: qaQuantize }
          { name: 'QA_MAX_CONCURRENT', value: string(qaMaxConcurrent) }
          // The memory the app may use: the instance's less the 272 MB the platform keeps. On 2 GB
          // bert-large's fp32 weights do not fit twice and are repacked part by part (docs/costs.md).
          { name: 'QA_MEMORY_MB', value: string(instanceMemoryMB - 272) }
          { name: 'HF_TOKEN', value: hfTokenReference }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${hostStorage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
        alwaysReady: alwaysReadyHttpInstances > 0 ? [{ name: 'http', instanceCount: alwaysReadyHttpInstances }] : []
        triggers: {
          http: {
            perInstanceConcurrency: qaMaxConcurrent
          }
        }
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }

  // The site starts (and resolves its Key Vault reference, once, then only about every 24 hours)
  // after the secret and every role its identity needs exist: an unresolved reference would leave
  // the literal @Microsoft.KeyVault(...) in HF_TOKEN, which shared/settings.py then refuses.
  dependsOn: [
    hfTokenSecret
    keyVaultSecretsUser
    hostBlobOwner
    hostQueueContributor
    hostTableContributor
    modelContainerContributor
    metricsPublisher
  ]

  // Basic (user/password) publishing credentials off: azd deploys with Entra ID.
  resource ftpPublishing 'basicPublishingCredentialsPolicies' = {
    name: 'ftp'
    properties: { allow: false }
  }

  resource scmPublishing 'basicPublishingCredentialsPolicies' = {
    name: 'scm'
    properties: { allow: false }
  }
}

// ---------------------------------------------------------------------------------------------
// Role assignments of the app's identity, by role definition id

// Host: AzureWebJobsStorage blobs (host keys, timer schedule monitor and locks) and reading the
// deployment package from its container (functionAppConfig.deployment.storage).
resource hostBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostStorage.id, identity.id, roles.storageBlobDataOwner)
  scope: hostStorage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// shared/store/refresh_queue.py enqueue (timer, POST /api/model/refresh), the queue trigger's reads and
// deletes, queue creation, and the host moving a failed message to model-refresh-poison.
resource hostQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostStorage.id, identity.id, roles.storageQueueDataContributor)
  scope: hostStorage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// The host's diagnostic events (AzureWebJobsStorage__tableServiceUri): Table storage.
resource hostTableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostStorage.id, identity.id, roles.storageTableDataContributor)
  scope: hostStorage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// shared/store/model_store.py: the refresh writes versions, current.json, the refresh.lock lease and
// last-refresh.json; serving reads versions and polls current.json. Scoped to the container.
resource modelContainerContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(modelStorage::blobService::modelContainer.id, identity.id, roles.storageBlobDataContributor)
  scope: modelStorage::blobService::modelContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Telemetry with APPLICATIONINSIGHTS_AUTHENTICATION_STRING (local auth off): the Functions host's, and
// the app's own events, exported from every thread by shared/telemetry/export.py.
resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, identity.id, roles.monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// The HF_TOKEN Key Vault reference (keyVaultReferenceIdentity), read by shared/refresh/hub.py's downloads.
resource keyVaultSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (useKeyVault) {
  name: guid(keyVault.id, identity.id, roles.keyVaultSecretsUser)
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---------------------------------------------------------------------------------------------
// Role assignments of the deploying user (principalId), so the first refresh can start from
// their machine: `python -m shared isolate` / `status` and `python -m shared refresh --enqueue`.

// `python -m shared isolate` (writes a version, the pointer, the lease), `status`, `verify`, `rollback`.
resource userModelContainerContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(principalId)) {
  name: guid(modelStorage::blobService::modelContainer.id, principalId, roles.storageBlobDataContributor)
  scope: modelStorage::blobService::modelContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: principalId
    principalType: principalType
  }
}

// `python -m shared refresh --enqueue` (scripts/postdeploy.sh): put a message on the refresh
// queue only. The queue exists (declared above), so the CLI's create-if-missing gets a 403 it ignores.
resource userRefreshQueueSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(principalId)) {
  name: guid(hostStorage::queueService::refreshQueue.id, principalId, roles.storageQueueDataMessageSender)
  scope: hostStorage::queueService::refreshQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: principalId
    principalType: principalType
  }
}

// ---------------------------------------------------------------------------------------------
// Operators' alerts: scheduled log searches over the app's `event=... key=value` lines and the
// host's poison-queue trace (docs/operations.md).

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-${resourceToken}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'qa-ops'
    enabled: true
    emailReceivers: [
      { name: 'operator', emailAddress: alertEmail, useCommonAlertSchema: true }
    ]
  }
}

var alertActions = empty(alertEmail) ? {} : { actionGroups: [actionGroup.id] }

resource refreshFailedAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-refresh-failed-${resourceToken}'
  location: location
  tags: tags
  properties: {
    displayName: 'Model refresh failed'
    description: 'A refresh ended with outcome=failed (event=refresh). See last_refresh in GET /api/model.'
    severity: 2
    enabled: true
    scopes: [applicationInsights.id]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: 'traces | where message startswith "event=refresh " | parse-kv message as (outcome: string, revision: string, error_code: string, reason: string) with (pair_delimiter=" ", kv_delimiter="=") | where outcome == "failed"'
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: { numberOfEvaluationPeriods: 1, minFailingPeriodsToAlert: 1 }
        }
      ]
    }
    actions: alertActions
  }
}

resource poisonMessageAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-refresh-poison-${resourceToken}'
  location: location
  tags: tags
  properties: {
    displayName: 'Refresh message moved to the poison queue'
    description: 'The host gave up on a refresh message after maxDequeueCount (3) tries, all transient failures, and moved it to ${refreshQueueName}-poison. Read the exceptions, then queue a refresh again.'
    severity: 2
    enabled: true
    scopes: [applicationInsights.id]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: 'traces | where message has "MaxDequeueCount" or message contains "moved to the poison queue" or message contains "${refreshQueueName}-poison"'
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: { numberOfEvaluationPeriods: 1, minFailingPeriodsToAlert: 1 }
        }
      ]
    }
    actions: alertActions
  }
}

// ---------------------------------------------------------------------------------------------
// Operators' workbook (Application Insights > Workbooks): asks per minute by status, model time
// by backend, busy and model_not_ready 503s, loads and fallbacks, refreshes; every chart a KQL
// query over the app's `event=...` lines (infra/workbook.json; docs/operations.md).

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, applicationInsights.id, 'isolated-qa-operations')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'Isolated QA operations'
    category: 'workbook'
    sourceId: applicationInsights.id
    // Opened from Azure Monitor > Workbooks too, its queries run against this Application Insights.
    serializedData: string(union(loadJsonContent('workbook.json'), { fallbackResourceIds: [applicationInsights.id] }))
  }
}

output functionAppName string = functionApp.name
output functionAppUri string = 'https://${functionApp.properties.defaultHostName}'
output hostQueueEndpoint string = hostStorage.properties.primaryEndpoints.queue
output modelBlobEndpoint string = modelStorage.properties.primaryEndpoints.blob
output modelContainer string = modelContainerName
output refreshQueue string = refreshQueueName
output applicationInsightsName string = applicationInsights.name
output workbookName string = workbook.properties.displayName
