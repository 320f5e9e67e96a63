#!/bin/bash
# Switchover downtime per part: migrates the test guest between two refvmm
# processes over loopback TCP, RUNS times, and prints one line per run: the
# engine's downtime (pause → the destination started the guest), the pause
# until the source read `Resumed` (ack), its expected downtime, the guest-observed gap (last
# heartbeat on the source's serial output to the first on the destination's,
# stamped as they arrive), the guest-measured gap (the destination's first
# `GAP` line: put `gap=<us>` in CMDLINE, else nan), the source's largest heartbeat gap from its first heartbeat
# to its pause (pre-copy included), the downtime breakdown (ms), the state's bytes
# and the status.
# Usage: benches/switchover.sh RUNS MEMORY VCPUS "CMDLINE" [LIMIT_MS]
#   e.g. benches/switchover.sh 5 1G 1 "cpl0=1" 10          (kernel-mode guest)
#        benches/switchover.sh 5 512M 32 "ws=16 rate=0 hb=200" 20
# after `cargo build --example refvmm`. Environment: R (the refvmm binary),
# BOOT (seconds the guest runs first, default 1.5), KEEP (copy the last
# report to $KEEP), MIGRATE_ARGS (more `refvmm migrate` flags, e.g.
# --switchover-probe), MIGRATE_TIMEOUT (seconds one migration may take,
# default 120: then both VMMs are killed and the run reported as without a
# result). Uses a random TCP port in 47200..47699 on 127.0.0.1.
set -u
R=${R:-$(dirname "$0")/../target/debug/examples/refvmm}
N=$1; MEM=$2; V=$3; CL=$4; LIM=${5:-10}
D=$(mktemp -d /tmp/livemig-switchover.XXXXXX)
STAMP=$(cat "$(dirname "$0")/serial_stamp.py")
PORT=$((47200 + RANDOM % 500))
for i in $(seq 1 $N); do
  rm -rf $D/*
  $R run --memory $MEM --vcpus $V --kernel builtin:testguest --cmdline "$CL" --api-socket $D/a.sock --serial stdio </dev/null 2>$D/a.err | python3 -c "$STAMP" $D/a.t &
  for t in $(seq 200); do [ -S $D/a.sock ] && [ -e $D/a.t.ready ] && break; sleep 0.05; done
  sleep ${BOOT:-1.5}
  $R receive --listen tcp:127.0.0.1:$PORT --api-socket $D/b.sock --serial stdio </dev/null 2>$D/b.err | python3 -c "$STAMP" $D/b.t &
  for t in $(seq 100); do [ -e $D/b.t.ready ] && break; sleep 0.05; done
  sleep 0.3
  timeout ${MIGRATE_TIMEOUT:-120} $R migrate --api-socket $D/a.sock --to tcp:127.0.0.1:$PORT --downtime-limit-ms $LIM ${MIGRATE_ARGS:-} >$D/rep.json 2>$D/m.err
  if [ $? -eq 124 ]; then
    # A migration that did not finish in time (e.g. never converged): say so, stop both VMMs
    # (otherwise `wait` below waits for ever) and go on with the next run.
    echo "run $i: no result within ${MIGRATE_TIMEOUT:-120} s; both VMMs killed"
    pkill -f -- "--api-socket $D/a.sock"; pkill -f -- "--api-socket $D/b.sock"
    wait; continue
  fi
  sleep 0.3
  # Quit the destination, and the source too if it still runs (a failed
  # migration leaves it running: `wait` would wait for ever).
  for sock in $D/b.sock $D/a.sock; do
    python3 -c "
import socket
s=socket.socket(socket.AF_UNIX);s.connect('$sock');s.sendall(b'{\"cmd\":\"quit\"}\n');s.recv(100)" 2>/dev/null
  done
  # A VMM still there 5 s later (a receiver that never got a connection)
  # is killed.
  for t in $(seq 50); do pgrep -f -- "--api-socket $D/" >/dev/null || break; sleep 0.1; done
  pkill -f -- "--api-socket $D/"
  wait
  python3 -c "
import json
r=json.load(open('$D/rep.json')); b=r['downtime_breakdown']
a=open('$D/a.t').read().split(); d=open('$D/b.t').read().split()
g=(float(d[0])-float(a[1]))*1e3
gg=float(d[3])*1e3 if len(d)>3 and float(d[3])>=0 else float('nan')
print('dt %.2f ack %.2f exp %.2f gap %.2f guest-gap %.2f floor %.2f | ' % (r['downtime_ms'], r.get('acknowledged_ms', float('nan')), r['expected_downtime_ms'], g, gg, float(a[2])*1e3) + ' '.join('%s=%.2f'%(k.replace('_ms',''),v) for k,v in b.items()), 'sb', r['state_bytes'], r['status'])" || { tail -5 $D/m.err; tail -3 $D/a.err; tail -3 $D/b.err; }
done
[ -n "${KEEP:-}" ] && cp $D/rep.json "$KEEP"; rm -rf $D
