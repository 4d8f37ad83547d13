"""Write the e2e test's copy of cluster.yaml: the same file, pointed at this machine.

    python tests/e2e/e2e_config.py OUT --key KEY --ssh-port P --ports GCS,DASHBOARD,AGENT,CLIENT \
        --base-venv VENV --token FILE --name NAME

What changes, and only that: the placeholders (head = 127.0.0.1, no workers, ssh_user
root with KEY, reached through the test's sshd on port P), the setup commands (reuse
VENV's packages instead of downloading torch: tests/e2e/node_setup.sh), the project and
token sources, and the head's ports (free ones, so other Ray instances here do not clash).
The start commands are cluster.yaml's own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ssh-port", type=int, required=True)
    ap.add_argument("--ports", required=True, help="GCS,DASHBOARD,AGENT,CLIENT")
    ap.add_argument("--base-venv", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    gcs, dash, agent, client = args.ports.split(",")

    text = (ROOT / "cluster.yaml").read_text()
    text = text.replace("<HEAD_IP>", "127.0.0.1").replace("<SSH_USER>", "root")
    cfg = yaml.safe_load(text)
    cfg["cluster_name"] = args.name
    cfg["provider"]["worker_ips"] = []
    cfg["max_workers"] = 0
    cfg["auth"] = {
        "ssh_user": "root",
        "ssh_private_key": args.key,
        # Ray's ssh has no port option: the port goes through a proxy command
        "ssh_proxy_command": f"nc 127.0.0.1 {args.ssh_port}",
    }
    cfg["file_mounts"] = {"~/nmoe": str(ROOT), "~/.ray/auth_token": args.token}
    cfg["setup_commands"] = [f"bash ~/nmoe/tests/e2e/node_setup.sh {args.base_venv}"]
    start = cfg["head_start_ray_commands"]
    assert any("--port=6379" in c and "--dashboard-port=8265" in c for c in start), start
    cfg["head_start_ray_commands"] = [
        c.replace("--port=6379", f"--port={gcs}").replace("--dashboard-port=8265", f"--dashboard-port={dash}")
        + (
            f" --dashboard-agent-listen-port={agent} --ray-client-server-port={client} --disable-usage-stats"
            if "ray start" in c
            else ""
        )
        for c in start
    ]
    args.out.write_text(yaml.safe_dump(cfg, sort_keys=False))


if __name__ == "__main__":
    main()
