// Deployment of the isolated question-answering app (azd up): a resource group and everything
// in it (resources.bicep). Identity only: no storage key, connection string or function key is
// created, read or output here.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; names the resource group and seeds the resources\' unique suffix.')
param environmentName string

// Regions that offered Flex Consumption (the Azure-Samples Flex Consumption azd templates' list):
// ARM would otherwise accept any region and fail late, at the plan. A newer region: add it here
// after `az functionapp list-flexconsumption-locations -o table` lists it.
@minLength(1)
@description('Region of every resource; it must offer Flex Consumption (az functionapp list-flexconsumption-locations).')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({ azd: { type: 'location' } })
param location string

@description('Object id of the deploying user (azd sets it): gets what `python -m shared isolate` and `python -m shared refresh --enqueue` need. Empty: no user roles.')
param principalId string = ''

@allowed(['User', 'ServicePrincipal', 'Group'])
@description('Kind of principalId (ServicePrincipal when a pipeline deploys).')
param principalType string = 'User'

@allowed([2048, 4096])
@description('Flex Consumption instance memory: 4096 (2 vCPU, the default: bert-large answers in 0.6-0.7x the time of 1 vCPU) or 2048 (1 vCPU: bert-large fits through its ONNX artifacts, serving and refresh, fp32 about a fifth cheaper per question; docs/costs.md). The app gets QA_MEMORY_MB = this less 272.')
param instanceMemoryMB int = 4096

@minValue(40)
@maxValue(1000)
@description('Most instances the app scales out to (Flex Consumption allows 40 to 1000).')
param maximumInstanceCount int = 40

@minValue(0)
@description('Always-ready instances of the HTTP group (billed while idle): 1 keeps a warm model for the first request.')
param alwaysReadyHttpInstances int = 0

@minValue(1)
@description('Inferences at once per instance: both QA_MAX_CONCURRENT and the HTTP perInstanceConcurrency.')
param qaMaxConcurrent int = 2

@description('Hub model id to isolate and serve (MODEL_ID).')
param modelId string = 'google-bert/bert-large-uncased-whole-word-masking-finetuned-squad'

@description('Branch, tag or commit to isolate (MODEL_REVISION).')
param modelRevision string = 'main'

@description('NCRONTAB of the refresh timer (MODEL_REFRESH_SCHEDULE): Sundays 03:00 UTC.')
param modelRefreshSchedule string = '0 0 3 * * 0'

@allowed(['onnx', 'torch'])
@description('Serving backend (QA_BACKEND): onnx uses the version\'s ONNX artifact when it has a usable one, else torch.')
param qaBackend string = 'onnx'

@allowed(['none', 'int8'])
@description('QA_QUANTIZE: none (fp32) or int8.')
param qaQuantize string = 'none'

@secure()
@description('Hub token for gated or private models (HF_TOKEN; set it with `azd env set-secret HF_TOKEN`). Empty: no Key Vault is created. Stored as a Key Vault secret; the app reads it through a Key Vault reference.')
param hfToken string = ''

@description('E-mail address that receives the alerts (failed refresh, poison message). Empty: the alerts still fire and show in the portal.')
param alertEmail string = ''

var tags = { 'azd-env-name': environmentName }

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module resources './resources.bicep' = {
  name: 'resources'
  scope: rg
  params: {
    location: location
    tags: tags
    resourceToken: toLower(uniqueString(subscription().id, environmentName, location))
    principalId: principalId
    principalType: principalType
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    alwaysReadyHttpInstances: alwaysReadyHttpInstances
    qaMaxConcurrent: qaMaxConcurrent
    modelId: modelId
    modelRevision: modelRevision
    modelRefreshSchedule: modelRefreshSchedule
    qaBackend: qaBackend
    qaQuantize: qaQuantize
    hfToken: hfToken
    alertEmail: alertEmail
  }
}

// Outputs become azd environment values (read by scripts/postdeploy.py and scripts/smoke). Names and URLs only.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = resources.outputs.functionAppName
output SERVICE_API_URI string = resources.outputs.functionAppUri
output AZURE_STORAGE_QUEUE_ENDPOINT string = resources.outputs.hostQueueEndpoint
output AZURE_MODEL_BLOB_ENDPOINT string = resources.outputs.modelBlobEndpoint
output MODEL_CONTAINER string = resources.outputs.modelContainer
output MODEL_REFRESH_QUEUE string = resources.outputs.refreshQueue
output MODEL_ID string = modelId
output APPLICATIONINSIGHTS_NAME string = resources.outputs.applicationInsightsName
output AZURE_WORKBOOK_NAME string = resources.outputs.workbookName
