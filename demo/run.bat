@echo off
rem One-command demo on Windows: same as `bash demo/run.sh` (see demo\run.py). Options are passed on.
cd /d "%~dp0.."
where py >nul 2>nul
if %errorlevel%==0 (
    py -3 demo\run.py %*
) else (
    python demo\run.py %*
)
