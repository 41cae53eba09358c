#!/usr/bin/env bash
# Prints the path of the real Bun binary installed by install.sh (not a
# wrapper script, so the process the bench measures is Bun itself).
set -euo pipefail
cd "$(dirname "$0")"
for candidate in node_modules/@oven/bun-linux-x64/bin/bun node_modules/@oven/bun-linux-x64-baseline/bin/bun node_modules/bun/bin/bun.exe node_modules/bun/bin/bun; do
  if [ -x "$candidate" ] && [ "$(head -c 4 "$candidate" | od -An -c | tr -d ' ')" = "177ELF" ]; then
    echo "$PWD/$candidate"
    exit 0
  fi
done
echo "bun-path.sh: no Bun binary under $PWD/node_modules (run install.sh)" >&2
exit 1
