#!/usr/bin/env bash
# Builds frozenopt._C into the checkout (an editable install) when csrc/ or
# setup.py is newer than the built module. A rebuild is compiled aside and
# renamed into place, so tests still running on the old module are not hurt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py="$(cd "$venv" && pwd)/bin/python"
exec 9>.build.lock
flock 9
here=$PWD
built=$(ls frozenopt/_C*.so 2>/dev/null | head -n 1 || true)
# A changed pyproject.toml (entry points, packages) needs a new editable install.
if [ -z "$built" ] || [ pyproject.toml -nt "$built" ] || ! (cd / && "$py" -c "import frozenopt, os, sys; sys.exit(os.path.dirname(frozenopt.__file__) != sys.argv[1])" "$here/frozenopt") 2>/dev/null; then
  echo "installing frozenopt (editable) and building frozenopt._C ..." >&2
  rm -f frozenopt/_C*.so  # unlinked, not overwritten: running processes keep theirs
  "$py" -m pip install -q --no-build-isolation --no-deps -e . >&2
  exit 0
fi
if [ -z "$(find csrc setup.py -newer "$built" -print -quit)" ]; then
  exit 0
fi
echo "rebuilding frozenopt._C ..." >&2
rm -rf build/stage
"$py" setup.py -q build_ext --build-lib build/stage >&2
for so in build/stage/frozenopt/_C*.so; do
  mv -f "$so" "frozenopt/$(basename "$so")"
done
