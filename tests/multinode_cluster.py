"""A real two-host Slurm cluster on one machine, for multi-node tests.

slurmctld and munged run in the test's own namespaces; each "host" is a slurmd in its own
network, UTS and mount namespace, with its own host name and address on a bridge created here.
Job tasks inherit their slurmd's namespaces, so ranks on different hosts talk over the bridge
exactly as they would over a cluster network, and the rendezvous host name resolves through a
private hosts file bind-mounted inside each host (the machine's /etc/hosts is never touched).

Only addresses on the bridge and namespaces created here are used; everything is removed again
(daemons by PID, then the veth pairs, the bridge and the namespaces).
"""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from slurm_cluster import (
    SBIN_DIRS,
    LocalSlurm,
    SlurmUnavailable,
    _find,
    ensure_installed,
    slurm_conf_text,
    start_munge,
    wait_until,
)

from switchdit_dist.train.distributed import free_port

# Inside every host the link has the same name, so GLOO_SOCKET_IFNAME can name it once.
HOST_IFNAME = "sl0"
# Slurm declares a silent slurmd DOWN after this long (default 300 s on real clusters). It must
# exceed the batch script's grace (SWITCHDIT_SRUN_GRACE_SECONDS) for a lost host, as on real
# clusters: a job Slurm sees fail with its node is requeued by Slurm before the script can record it.
SLURMD_TIMEOUT_S = 30


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([_find("ip") or "ip", *args], capture_output=True, text=True, check=check)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot host the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare"):
        if _find(tool) is None:
            return f"{tool} is not installed"
    probe = f"sdprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.0.0.0/8 that no route or address of this machine uses."""
    routes = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    used = []
    for token in routes.split():
        try:
            used.append(ipaddress.ip_network(token, strict=False))
        except ValueError:
            continue
    rng = random.Random(os.getpid())
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(64, 250)}.{rng.randrange(1, 250)}.0/24")
        if not any(net.overlaps(u) for u in used if u.version == 4 and u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test bridge")


@dataclass
class Host:
    name: str
    netns: str
    veth: str
    address: str


@dataclass
class MultiNodeSlurm(LocalSlurm):
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    netns_dir_existed: bool = True

    def host_pids(self, host: Host) -> list[int]:
        out = _ip("netns", "pids", host.netns, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill_host(self, host: Host) -> None:
        """The host dies: every process in its namespace (slurmd, slurmstepd, ranks) gets SIGKILL.
        The link stays up, as a switch port does; nothing answers behind it any more."""
        for _ in range(5):  # processes forked while we kill are caught on the next round
            pids = self.host_pids(host)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_until(lambda: not self.host_pids(host), 10, f"{host.name}'s processes to die")

    def stop(self) -> None:
        super().stop()
        for host in self.hosts:
            self.kill_host(host)
            _ip("link", "delete", host.veth, check=False)
            _ip("netns", "delete", host.netns, check=False)
        if self.bridge:
            _ip("link", "delete", self.bridge, check=False)
        if not self.netns_dir_existed and Path("/run/netns").is_dir():
            # `ip netns add` mounts /run/netns on first use; leave the machine as we found it
            for _ in range(8):  # each failed start may have stacked one more mount
                if subprocess.run(["umount", "/run/netns"], capture_output=True).returncode != 0:
                    break
            try:
                Path("/run/netns").rmdir()
            except OSError:
                pass


def start_multinode_cluster(root: Path, num_hosts: int = 2) -> MultiNodeSlurm:
    """Start munged, slurmctld and ``num_hosts`` slurmd hosts under ``root``; wait until all idle."""
    ensure_installed()
    netns_dir_existed = Path("/run/netns").exists()  # before the probe below creates it
    why = namespaces_unavailable()
    if why is not None:
        raise SlurmUnavailable(why)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
    tag = f"{os.getpid() % 100000}"
    cluster = MultiNodeSlurm(
        root=root, node="", cpus=1, env={}, bridge=f"sdbr{tag}", netns_dir_existed=netns_dir_existed
    )
    try:
        subnet = _free_subnet()
        addresses = list(subnet.hosts())
        ctld_addr = str(addresses[0])
        _ip("link", "add", cluster.bridge, "type", "bridge")
        _ip("addr", "add", f"{ctld_addr}/{subnet.prefixlen}", "dev", cluster.bridge)
        _ip("link", "set", cluster.bridge, "up")
        hosts_file = root / "hosts"
        # slurmctld only runs under this machine's own name
        controller = socket.gethostname().split(".")[0]
        lines = ["127.0.0.1 localhost", f"{ctld_addr} {controller}"]
        for i in range(1, num_hosts + 1):
            host = Host(f"node{i}", f"sd{tag}-node{i}", f"sd{tag}v{i}", str(addresses[i]))
            cluster.hosts.append(host)
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", HOST_IFNAME, "netns", host.netns)
            _ip("link", "set", host.veth, "master", cluster.bridge, "up")
            for args in (
                ("addr", "add", f"{host.address}/{subnet.prefixlen}", "dev", HOST_IFNAME),
                ("link", "set", HOST_IFNAME, "up"),
                ("link", "set", "lo", "up"),
            ):
                _ip("-n", host.netns, *args)
            (root / "spool" / host.name).mkdir()
            lines.append(f"{host.address} {host.name}")
        hosts_file.write_text("\n".join(lines) + "\n")

        cluster.processes["munged"], sock = start_munge(root)
        node_lines = "".join(
            f"NodeName={h.name} NodeAddr={h.address} CPUs=1 RealMemory=2000 State=UNKNOWN\n"
            for h in cluster.hosts
        )
        node_lines += "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
        conf = root / "slurm.conf"
        conf.write_text(
            slurm_conf_text(
                root,
                controller,
                ctld_addr,
                free_port(),
                free_port(),
                sock,
                node_lines,
                slurmd_paths="slurmd-%n",
                extra=f"SlurmdTimeout={SLURMD_TIMEOUT_S}\n",
            )
        )
        path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
        cluster.env = dict(os.environ, SLURM_CONF=str(conf), PATH=path, GLOO_SOCKET_IFNAME=HOST_IFNAME)
        cluster.processes["slurmctld"] = subprocess.Popen(
            [_find("slurmctld"), "-D"],
            env=cluster.env,
            stdin=subprocess.DEVNULL,
            stdout=open(root / "log" / "slurmctld.stdout", "w"),
            stderr=subprocess.STDOUT,
        )
        for host in cluster.hosts:
            # Not `ip netns exec`: it remounts /sys and slurmd then fails to find its cgroups.
            # nsenter, unshare and `exec` replace themselves, so the PID is slurmd's own.
            inner = (
                f"hostname {host.name} && mount --bind {hosts_file} /etc/hosts && "
                f"exec {_find('slurmd')} -D -N {host.name} -f {conf}"
            )
            cluster.processes[f"slurmd-{host.name}"] = subprocess.Popen(
                [
                    _find("nsenter"),
                    f"--net=/run/netns/{host.netns}",
                    _find("unshare"),
                    "--uts",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    inner,
                ],
                env=cluster.env,
                stdin=subprocess.DEVNULL,
                stdout=open(root / "log" / f"slurmd-{host.name}.stdout", "w"),
                stderr=subprocess.STDOUT,
            )

        def all_idle() -> bool:
            for name, proc in cluster.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early; see {root / 'log'}")
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            return out.returncode == 0 and states == {h.name: "idle" for h in cluster.hosts}

        wait_until(all_idle, 60, "both Slurm hosts to become idle")
    except BaseException:
        cluster.stop()
        raise
    return cluster
