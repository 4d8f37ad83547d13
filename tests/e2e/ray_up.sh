#!/usr/bin/env bash
# `ray up cluster.yaml` for real, end to end, on this machine (as root, Debian):
#
#   1. openssh-server, rsync and netcat from Debian if missing;
#   2. an sshd of the test's own on 127.0.0.1 (a free port, a key made for this run, root
#      by key only), in a PID and mount namespace of its own: `ray stop` there (ray up and
#      ray down run it) only sees this cluster's processes, /root and /tmp there are
#      directories of this run, and ending the sshd ends everything the cluster started;
#   3. a copy of cluster.yaml: head 127.0.0.1, no workers (tests/e2e/e2e_config.py);
#   4. ray up -y; the dashboard answers on 127.0.0.1 only and refuses a wrong Ray token;
#      docs/how-to/cluster.md's `ray job submit ... -- nmoe train --address auto` (smoke config) must
#      leave a results.json with the NMoE and the baselines; `ray exec` on the head; ray down -y.
#
# Every step has a timeout; any failure exits non-zero (with the logs' tails); the trap
# ends the sshd (and so the cluster) and removes the run's files.
#
#   sudo bash tests/e2e/ray_up.sh    # NMOE_E2E_STEP_TIMEOUT (s, default 600) bounds each long step;
#                                    # NMOE_E2E_LOGS=DIR keeps the logs there
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${NMOE_VENV:-$ROOT/.venv}
STEP=${NMOE_E2E_STEP_TIMEOUT:-600}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
say() { echo "==> ray_up.sh: $*"; }
die() { echo "ray_up.sh: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (an sshd, a PID namespace)"
[ -x "$VENV/bin/ray" ] || die "no Ray in $VENV (bash scripts/install.sh first)"

# ------------------------------------------------------------------ 1. packages
if ! { [ -x /usr/sbin/sshd ] && command -v ssh-keygen rsync nc unshare >/dev/null; }; then
  say "installing openssh-server, rsync, netcat-openbsd"
  # never let the package start a system sshd (on every interface): Docker's policy-rc.d does that
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  (timeout "$STEP" apt-get update -qq &&
   DEBIAN_FRONTEND=noninteractive timeout "$STEP" apt-get install -y -qq --no-install-recommends \
     openssh-server openssh-client rsync netcat-openbsd) || { [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d; die "apt-get install"; }
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

# ------------------------------------------------------------------ 2. sshd in a namespace
unshare --pid --fork --mount-proc true || die "cannot make a PID/mount namespace (unshare; CAP_SYS_ADMIN)"
E2E=$(mktemp -d /var/tmp/nmoe-e2e.XXXXXX)  # not under /tmp: /tmp is replaced inside the namespace
NS_PID=
cleanup() {
  local rc=$?
  set +e
  if [ -n "$NS_PID" ]; then
    kill -KILL "$NS_PID" 2>/dev/null  # unshare --kill-child: its sshd (the namespace's init), then all in it, go too
    wait "$NS_PID" 2>/dev/null
  fi
  if [ "$rc" != 0 ]; then
    for f in sshd.log ray_up.log checks.log train.log exec.log ray_down.log; do
      [ -s "$E2E/$f" ] && { echo "---- $f (tail)"; tail -n 40 "$E2E/$f"; }
    done
    echo "---- head's ray logs (tail)"; tail -n 20 "$E2E"/tmp/ray/session_latest/logs/{raylet.err,gcs_server.err} 2>/dev/null
  fi
  if [ -n "${NMOE_E2E_LOGS:-}" ]; then  # keep the logs and the config copy (the key stays behind)
    mkdir -p "$NMOE_E2E_LOGS" && cp "$E2E"/*.log "$E2E/cluster.yaml" "$NMOE_E2E_LOGS"/ 2>/dev/null
  fi
  rm -rf "$E2E" 2>/dev/null || { sleep 2; rm -rf "$E2E"; }
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r SSH_PORT GCS_PORT DASH_PORT AGENT_PORT CLIENT_PORT < <("$VENV/bin/python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
mkdir -p "$E2E/home" "$E2E/tmp" "$E2E/local" /run/sshd
# the venv and its interpreter may live under /root (pyenv) or /tmp (a clone there), which the
# namespace replaces: it shows each of them at its own path, read-only
BASE_PY=$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')
EXPOSE=()
for path in "$BASE_PY" "$(cd "$VENV" && pwd -P)"; do
  case $path in
    /root/*) EXPOSE+=("$path" "$E2E/home${path#/root}") ;;
    /tmp/*) EXPOSE+=("$path" "$E2E/tmp${path#/tmp}") ;;
    *) continue ;;
  esac
  mkdir -p "${EXPOSE[-1]}"
done
chmod 700 "$E2E/home"; chmod 1777 "$E2E/tmp"
ssh-keygen -q -t ed25519 -N '' -C nmoe-e2e -f "$E2E/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -C nmoe-e2e-host -f "$E2E/host_ed25519"
echo "from=\"127.0.0.1\" $(cat "$E2E/id_ed25519.pub")" > "$E2E/authorized_keys"
"$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$E2E/auth_token"  # this cluster's own Ray token
chmod 600 "$E2E/auth_token"
cat > "$E2E/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $E2E/host_ed25519
PidFile none
AuthorizedKeysFile $E2E/authorized_keys
AllowUsers root
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
EOF
/usr/sbin/sshd -t -f "$E2E/sshd_config" || die "sshd config"
unshare --pid --fork --kill-child --mount-proc --propagation private \
  bash -c 'e2e=$1; shift
           while [ $# -ge 2 ]; do mount -o bind,ro "$1" "$2" || exit 1; shift 2; done
           mount --rbind "$e2e/home" /root && mount --rbind "$e2e/tmp" /tmp &&
           exec /usr/sbin/sshd -D -f "$e2e/sshd_config" -E "$e2e/sshd.log"' \
  _ "$E2E" "${EXPOSE[@]}" &
NS_PID=$!
for _ in $(seq 100); do nc -z 127.0.0.1 "$SSH_PORT" 2>/dev/null && break; sleep 0.2; done
nc -z 127.0.0.1 "$SSH_PORT" || die "sshd did not listen on 127.0.0.1:$SSH_PORT"
on_head() {  # a command on the "head", i.e. in the namespace, as ray up's ssh runs it
  timeout 60 ssh -q -i "$E2E/id_ed25519" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ProxyCommand="nc 127.0.0.1 $SSH_PORT" root@127.0.0.1 "$1"
}
on_head 'test "$HOME" = /root && test "$(ps -e --no-headers | wc -l)" -lt 10' || die "ssh into the namespace"
say "sshd on 127.0.0.1:$SSH_PORT (namespace of pid $NS_PID)"

# ------------------------------------------------------------------ 3. the cluster config
NAME=nmoe-e2e-$$
CONFIG=$E2E/cluster.yaml
"$VENV/bin/python" "$ROOT/tests/e2e/e2e_config.py" "$CONFIG" --key "$E2E/id_ed25519" --ssh-port "$SSH_PORT" \
  --ports "$GCS_PORT,$DASH_PORT,$AGENT_PORT,$CLIENT_PORT" --base-venv "$VENV" --token "$E2E/auth_token" --name "$NAME"

# ------------------------------------------------------------------ 4. up, train, down
export RAY_TMPDIR=$E2E/local  # the launcher's own state (cluster-<name>.state) stays in this run
export PATH=$VENV/bin:$PATH
cd "$ROOT"
say "ray up (log: ray_up.log)"
timeout "$STEP" ray up -y --no-config-cache "$CONFIG" > "$E2E/ray_up.log" 2>&1 || die "ray up"

say "checks: the dashboard answers on 127.0.0.1 only, a wrong Ray token is refused (log: checks.log)"
DASH=http://127.0.0.1:$DASH_PORT
"$VENV/bin/python" - "$DASH_PORT" >> "$E2E/checks.log" 2>&1 <<'PY' || die "the dashboard is not on 127.0.0.1:$DASH_PORT only"
import socket, sys
port = int(sys.argv[1])
socket.create_connection(("127.0.0.1", port), timeout=5).close()
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:  # this machine's own non-loopback address, if it has one (a UDP connect sends nothing)
    probe.connect(("10.255.255.255", 1))
    ip = probe.getsockname()[0]
except OSError:
    ip = None
if ip and not ip.startswith("127."):
    try:
        socket.create_connection((ip, port), timeout=2).close()
        sys.exit(f"the dashboard answers on {ip}:{port}")
    except OSError:
        pass
print(f"dashboard: 127.0.0.1:{port}, not on {ip}")
PY
WRONG=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))')
if RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$WRONG timeout 120 ray job list --address "$DASH" >> "$E2E/checks.log" 2>&1; then
  die "a wrong Ray token was let in"
fi
RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$E2E/auth_token timeout 120 ray job list --address "$DASH" >> "$E2E/checks.log" 2>&1 \
  || die "the cluster's own token was refused"

say "ray job submit ... -- nmoe train --address auto (log: train.log)"
# as in docs/how-to/cluster.md; the entrypoint runs on the head, whose home (root's) is $E2E/home here
HEAD_HOME=$(getent passwd root | cut -d: -f6)
RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$E2E/auth_token timeout "$STEP" ray job submit --address "$DASH" --working-dir . -- \
  nmoe train --address auto --config configs/smoke.yaml --set "data.root=$HEAD_HOME/nmoe/data" \
  --set 'stage3.variants=[fedgate]' --no-tracking --out "$HEAD_HOME/e2e-run" > "$E2E/train.log" 2>&1 || die "ray job submit"
RESULTS=$E2E/home/e2e-run/results.json
[ -s "$RESULTS" ] || die "no results.json after the run"
"$VENV/bin/python" - "$RESULTS" <<'PY' || die "results.json is not a finished run"
import json, sys
res = json.load(open(sys.argv[1]))
want = {"nmoe/fedgate", "local_only", "fedavg_global", "centralized_moe"}
assert set(res["methods"]) == want, res["methods"].keys()
assert res["missing_clients"] == [], res["missing_clients"]
print("results:", {m: round(v["global_acc"], 3) for m, v in res["methods"].items()})
PY

say "ray exec on the head, as docs/how-to/cluster.md has it: the venv from ~/.bashrc (log: exec.log)"
timeout 300 ray exec "$CONFIG" 'cd ~/nmoe && nmoe --help > /dev/null &&
  python -c "import ray; ray.init(address=\"auto\"); print(\"nodes alive:\", sum(n[\"Alive\"] for n in ray.nodes()))"' \
  > "$E2E/exec.log" 2>&1 || die "ray exec"
grep -q "nodes alive: 1" "$E2E/exec.log" || die "ray exec: the head's driver did not see the one-node cluster"

say "ray down (log: ray_down.log)"
timeout 300 ray down -y "$CONFIG" > "$E2E/ray_down.log" 2>&1 || die "ray down"
on_head 'pgrep -f "ray/core/src/ray/(raylet|gcs)" >/dev/null' && die "ray down left Ray running on the head"
say "OK"
