#!/usr/bin/env bash
# The e2e test's stand-in for cluster.yaml's setup_commands, run on the "node" by `ray up`.
#
# Like the real ones it makes ~/nmoe-venv and installs the synced project (~/nmoe) into it
# with `pip install -e`; unlike them it does not download torch: the venv sees the packages
# of an already installed venv (BASE) through a .pth file, and gets a `ray` of its own so
# that Ray's processes (and the client actors) run the synced copy of the project.
#
#   bash ~/nmoe/tests/e2e/node_setup.sh BASE_VENV
set -euo pipefail
BASE=${1:?usage: node_setup.sh BASE_VENV}
VENV=$HOME/nmoe-venv
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'

[ -x "$VENV/bin/python" ] || "$BASE/bin/python" -m venv --without-pip "$VENV"
"$BASE/bin/python" -c "$purelib" > "$("$VENV/bin/python" -c "$purelib")/nmoe-e2e-base.pth"
"$BASE/bin/python" -m pip --python "$VENV/bin/python" install -q --no-deps --no-build-isolation -e "$HOME/nmoe"
printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' "$VENV/bin/python" > "$VENV/bin/ray"
chmod +x "$VENV/bin/ray"
cd "$HOME"  # the project that runs is the synced one, with everything it needs
"$VENV/bin/python" -c 'import os, actors.coordinator as m, torch; assert m.__file__.startswith(os.path.expanduser("~/nmoe/")), m.__file__'
echo "node_setup: $("$VENV/bin/nmoe" --help | head -1)"
