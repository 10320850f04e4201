#!/bin/bash
# A stand-in for an AI coding agent CLI (used by the demo): it leaves work behind the way
# `npm install` and `next build` do, a setsid daemon, a double-forked watcher and a nohup'd
# dev server, then works for $1 seconds itself.
setsid bash -c 'exec -a npm-install sleep 600' &
( bash -c 'exec -a next-build sleep 601' & )
nohup bash -c 'exec -a next-dev-server sleep 602' >/dev/null 2>&1 &
for i in $(seq "${1:-3}"); do echo "step $i"; sleep 1; done
