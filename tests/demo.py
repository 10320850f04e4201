"""`make demo`: the seed failures of parallel agents, each one met by corral, end to end.

Four agents are added in parallel (no lost config write); four runs start in parallel on
their own sessions, sharing one OAuth profile against a local token server whose refresh
tokens rotate (one refresh reaches it, not four); each agent leaves an `npm install`-like
and a `next build`-like process behind; one owner is SIGKILLed (its run dies whole); the
others finish (what they left dies with them). At the end nothing is left running.

Every command is printed as it is run, with what corral answered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _auth_util import OAuthServer  # noqa: E402  (the tests' real OAuth 2.0 server)

AGENT = HERE / "fake-agent.sh"
BOLD, OFF = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{OFF}", flush=True)


def corral(*args: str, env: dict[str, str], show: bool = True, check: bool = True, **kw) -> subprocess.CompletedProcess:
    if show:
        print(f"$ corral {' '.join(args)}", flush=True)
    proc = subprocess.run(["corral", *args], env=env, capture_output=True, text=True, **kw)
    if show and proc.stdout.strip():
        print(proc.stdout.rstrip())
    if show and proc.returncode == 0 and proc.stderr.strip():
        print(proc.stderr.rstrip())
    if check and proc.returncode != 0:
        print(proc.stderr.rstrip())
        raise SystemExit(f"demo FAILED: corral {' '.join(args)} exited {proc.returncode}")
    return proc


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="corral-demo."))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(XDG_CONFIG_HOME=str(tmp / "config"), XDG_STATE_HOME=str(tmp / "state"),
               XDG_RUNTIME_DIR=str(tmp / "run"))
    suffix = uuid.uuid4().hex[:4]
    agents = [f"lane{i}_{suffix}" for i in range(1, 5)]
    server = OAuthServer()
    try:
        say("the machine")
        print(corral("doctor", env=env, show=False).stdout.splitlines()[-4])

        say("four `agents add` at once (the lost-write race of OpenClaw #43367)")
        procs = [subprocess.Popen(["corral", "agents", "add", a, "--auth", "shared", "--max-runs", "2"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in agents]
        for p in procs:
            print("  " + p.communicate()[0].strip())
        listed = json.loads(corral("agents", "list", "--json", env=env, show=False).stdout)
        print(f"agents in config.toml: {len(listed)} of 4")
        assert len(listed) == 4

        say("one OAuth credential for all four (refresh tokens rotate; reuse is rejected)")
        corral("auth", "add", "shared", "--token-url", server.token_url, "--client-id", "corral-test", env=env)
        pair = server.mint()
        corral("auth", "login", "shared", "--refresh-token-stdin", env=env, input=pair["refresh_token"] + "\n")
        before = server.stats()

        say("four runs in parallel, each on its own session; one is attached, the rest detached")
        owner = subprocess.Popen(["corral", "run", "--session", "pr-1", agents[0], "--", str(AGENT), "600"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        detached = [subprocess.Popen(["corral", "run", "--detach", "--session", f"pr-{i + 2}", a, "--", str(AGENT),
                                      str(3 + i)], env=env, stdout=subprocess.PIPE, text=True)
                    for i, a in enumerate(agents[1:])]
        ids = [p.communicate()[0].strip() for p in detached]
        deadline = time.monotonic() + 20
        while len(json.loads(corral("ps", "--json", env=env, show=False).stdout)) < 4:
            assert time.monotonic() < deadline, "runs did not start"
            time.sleep(0.1)
        time.sleep(0.5)
        corral("ps", env=env)
        after = server.stats()
        refreshes = after.get("refreshed", 0) - before.get("refreshed", 0)
        reused = after.get("reused", 0)
        print(f"token refreshes that reached the server for 4 runs: {refreshes}; reuse rejections: {reused}")
        corral("sessions", "list", env=env)

        say(f"SIGKILL the attached owner of {agents[0]} (corral itself dies, no cleanup code runs)")
        runs = json.loads(corral("ps", "--json", env=env, show=False).stdout)
        (killed,) = [r for r in runs if r["agent"] == agents[0]]
        shown = json.loads(corral("show", killed["id"], "--json", env=env, show=False).stdout)
        pids = [p["pid"] for p in shown["processes"]]
        print("its processes: " + ", ".join(f"{p['pid']} {' '.join(p['argv'])[:30]}" for p in shown["processes"]))
        t0 = time.monotonic()
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        while any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
                  for p in pids):
            assert time.monotonic() - t0 < 5, "the run outlived its owner"
            time.sleep(0.01)
        print(f"all {len(pids)} processes of run {killed['id']} gone {1000 * (time.monotonic() - t0):.0f} ms "
              "after its owner died (the watchdog killed the cgroup)")

        say("the other three finish; what they left behind dies with them")
        for run_id in ids:
            corral("wait", run_id, env=env, timeout=60)
        corral("ps", "--all", env=env)

        say("a hostile agent tries to read the token store and to leave its cgroup (isolation standard)")
        store = tmp / "state" / "corral" / "auth"
        cgroup2 = next(line.split()[4] for line in open("/proc/self/mountinfo") if " - cgroup2 " in line)
        attack = (f"cat {store}/* 2>&1 | head -1; ls {store} 2>&1; echo $$ > {cgroup2}/cgroup.procs; "
                  "echo \"processes I can see: $(ls /proc | grep -c '^[0-9]')\"; sleep 1000 & setsid sleep 1001 &")
        hostile = corral("run", agents[1], "--", "sh", "-c", attack, env=env, check=False)
        tokens = [t for f in store.glob("*.json") if (t := json.loads(f.read_text()).get("refresh_token"))]
        leaked = any(t in hostile.stdout + hostile.stderr for t in tokens)
        print(f"token store files with a refresh token: {len(tokens)}; seen by the agent: "
              f"{'YES' if leaked else 'none'}; its exit status {hostile.returncode}")
        if leaked or not tokens:
            print("demo FAILED: the agent read the token store")
            return 1

        say("nothing left running")
        live = json.loads(corral("ps", "--json", env=env, show=False).stdout)
        strays = subprocess.run(["pgrep", "-f", "^(npm-install|next-build|next-dev-server) "], capture_output=True,
                                text=True).stdout.split()
        held = [s for s in json.loads(corral("sessions", "list", "--json", env=env, show=False).stdout)
                if s["state"] != "free"]
        gc = json.loads(corral("gc", "--json", env=env, show=False).stdout)
        print(f"live runs: {len(live)}   stray npm-install/next-build/next-dev-server: {len(strays)}   "
              f"sessions still held: {len(held)}   gc reaped: {len(gc['reaped'])}")
        if live or strays or held or gc["reaped"]:
            print("demo FAILED: something survived")
            return 1
        print("demo OK")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
