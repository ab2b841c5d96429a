# azd "postdeploy" hook on Windows (azure.yaml; scripts/postdeploy.sh elsewhere): both run
# scripts/postdeploy.py (standard library only, no .venv needed), which queues the first model
# refresh with your Azure CLI identity and then runs scripts/smoke against the deployment.
$ErrorActionPreference = 'Stop'
Set-Location (Join-Path $PSScriptRoot '..')
. (Join-Path $PSScriptRoot 'python.ps1')
$python = @(Find-Python)  # always an array: a one-element output would be unrolled to a string
& $python[0] @($python | Select-Object -Skip 1) scripts/postdeploy.py @args
exit $LASTEXITCODE
