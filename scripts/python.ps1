# Find-Python: the interpreter the Windows hooks run (dot-sourced by scripts/*.ps1), as a command
# and its leading arguments: $env:PYTHON, else the project's .venv, else the py launcher (3.11+),
# else python on PATH. The hooks' scripts use the standard library only.
# Call it as $python = @(Find-Python): PowerShell unrolls a function's array output, so a
# one-element answer would come back as a bare string and $python[0] would be its first character.
function Find-Python {
  if ($env:PYTHON) { return @($env:PYTHON) }
  $venv = Join-Path (Get-Location) '.venv\Scripts\python.exe'
  if (Test-Path $venv) { return @($venv) }
  if (Get-Command py -ErrorAction SilentlyContinue) { return @('py', '-3') }
  if (Get-Command python -ErrorAction SilentlyContinue) { return @('python') }
  throw 'No Python found: install Python 3.11 (python.org or the Microsoft Store) and run the hook again.'
}
