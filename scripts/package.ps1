# azd "prepackage" hook on Windows (azure.yaml; scripts/package.sh elsewhere): both run
# scripts/package.py, which installs requirements.lock into .python_packages (hashes checked,
# CPU-only torch, Linux x86_64 / CPython 3.11 wheels) and measures the zip azd uploads.
# Usage: pwsh scripts/package.ps1 [--zip PATH]   ($env:PYTHON: the interpreter whose pip is used)
$ErrorActionPreference = 'Stop'
Set-Location (Join-Path $PSScriptRoot '..')
. (Join-Path $PSScriptRoot 'python.ps1')
$python = @(Find-Python)  # always an array: a one-element output would be unrolled to a string
& $python[0] @($python | Select-Object -Skip 1) scripts/package.py @args
exit $LASTEXITCODE
