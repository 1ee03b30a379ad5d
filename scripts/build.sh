#!/usr/bin/env bash
# Builds frozenopt._C into the checkout (an editable install) when csrc/ or
# setup.py is newer than the built module, or when the venv's torch is not the
# one it was built against. A rebuild is compiled aside and renamed into place,
# so tests still running on the old module are not hurt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py="$(cd "$venv" && pwd)/bin/python"
exec 9>.build.lock
flock 9
here=$PWD
built=$(ls frozenopt/_C*.so 2>/dev/null | head -n 1 || true)
# Where the venv finds frozenopt, and whether that is this checkout, without importing it
# (importing it imports torch: seconds).
installed_here() {
  (cd / && "$py" -c "import importlib.util, os, sys; s = importlib.util.find_spec('frozenopt'); sys.exit(s is None or os.path.dirname(s.origin) != sys.argv[1])" "$here/frozenopt") 2>/dev/null
}
# A changed pyproject.toml (entry points, packages) or this script needs a new editable install.
if [ -z "$built" ] || [ pyproject.toml -nt "$built" ] || [ scripts/build.sh -nt "$built" ] || ! installed_here; then
  echo "installing frozenopt (editable) and building frozenopt._C ..." >&2
  rm -f frozenopt/_C*.so frozenopt/_build_info.py  # unlinked, not overwritten: running processes keep theirs
  # compat: the checkout itself goes on sys.path, so frozenopt is found as a
  # package even from a folder holding a directory named frozenopt (a clone),
  # which a path-based import would otherwise take for a namespace package.
  "$py" -m pip install -q --no-build-isolation --no-deps -e . --config-settings editable_mode=compat >&2
  exit 0
fi
# torch.__version__ read from torch/version.py, again without importing torch.
torch_now=$("$py" -c "import importlib.util, os, runpy; d = importlib.util.find_spec('torch').submodule_search_locations[0]; print(runpy.run_path(os.path.join(d, 'version.py'))['__version__'])")
torch_built=$(sed -n "s/^TORCH_VERSION = '\(.*\)'$/\1/p" frozenopt/_build_info.py 2>/dev/null || true)
if [ "$torch_now" = "$torch_built" ] && [ -z "$(find csrc setup.py -newer "$built" -print -quit)" ]; then
  exit 0
fi
echo "rebuilding frozenopt._C (torch $torch_now) ..." >&2
rm -rf build/stage
"$py" setup.py -q build_ext --build-lib build/stage >&2
for so in build/stage/frozenopt/_C*.so; do
  mv -f "$so" "frozenopt/$(basename "$so")"
done
mv -f build/stage/frozenopt/_build_info.py frozenopt/_build_info.py
