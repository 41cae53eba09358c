#!/usr/bin/env bash
# Installs the peers securechat is measured against into bench/peers/node_modules
# from the npm registry: `ws` (for the Node tutorial server) and `bun` (whose
# npm package ships the Bun binary). Idempotent; prints the paths it checked.
set -euo pipefail
cd "$(dirname "$0")"
command -v node >/dev/null || { echo "install.sh: node is required (apt-get install nodejs npm)" >&2; exit 1; }
if [ ! -d node_modules/ws ] || [ ! -x "$(./bun-path.sh 2>/dev/null || echo /nonexistent)" ]; then
  npm install --no-audit --no-fund --loglevel=error
fi
BUN="$(./bun-path.sh)"
echo "ws $(node -p "require('./node_modules/ws/package.json').version") with node $(node --version)"
echo "bun $("$BUN" --version) at $BUN"
