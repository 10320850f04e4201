#!/bin/bash
# corral demo: three agents in parallel, each leaving detached children behind the way
# `npm install` / `next build` do; one is killed whole; the others finish; nothing is left.
set -euo pipefail

export XDG_STATE_HOME="${DEMO_STATE:-$(mktemp -d /tmp/corral-demo.XXXXXX)}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
suffix=$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')
agents=("lane1_$suffix" "lane2_$suffix" "lane3_$suffix")

say "backend this machine offers"
corral doctor | sed -n '/^chosen/p'

# Each agent is tests/fake-agent.sh: a setsid'd 'npm-install', a double-forked
# 'next-build', a nohup'd 'next-dev-server', then N seconds of its own work.
agent="$(cd "$(dirname "$0")" && pwd)/fake-agent.sh"

say "start three agents in parallel (detached)"
ids=()
ids+=("$(corral run --detach "${agents[0]}" -- "$agent" 600)")
ids+=("$(corral run --detach "${agents[1]}" -- "$agent" 3)")
ids+=("$(corral run --detach "${agents[2]}" -- "$agent" 4)")
for i in 0 1 2; do echo "${agents[$i]} -> run ${ids[$i]}"; done
sleep 1

say "corral ps: every run with its process count"
corral ps

say "corral show ${ids[0]}: the tree of one run, detached children included"
corral show "${ids[0]}" | sed -n '/^processes:/,/^inspect/p'
pids=$(corral show --json "${ids[0]}" | python3 -c 'import json,sys; print(" ".join(str(p["pid"]) for p in json.load(sys.stdin)["processes"]))')

say "corral kill ${ids[0]} (${agents[0]}): the whole cgroup, verified empty"
corral kill "${ids[0]}"
left=0; for p in $pids; do if [ -e "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null; then left=$((left+1)); fi; done
echo "processes of ${ids[0]} still alive: $left (of $(echo $pids | wc -w) it had)"

say "the other two finish on their own; what they left behind dies with them"
corral wait "${ids[1]}" && echo "${ids[1]} exited 0"
corral wait "${ids[2]}" && echo "${ids[2]} exited 0"

say "corral ps --all"
corral ps --all

say "nothing left running"
alive=$(corral ps --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
strays=$(pgrep -f -c -- '^(npm-install|next-build|next-dev-server) ' || true)
echo "live runs: $alive   stray npm-install/next-build/next-dev-server processes: ${strays:-0}"
if [ "$alive" != 0 ] || [ "$left" != 0 ] || [ "${strays:-0}" != 0 ]; then echo "demo FAILED: something survived"; exit 1; fi
echo "demo OK"
