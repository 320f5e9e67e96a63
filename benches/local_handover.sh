#!/bin/bash
# Local hand-over vs TCP migration of the same memfd guest, alternating in
# the same run: engine downtime and its breakdown, total time, and the
# guest-observed switchover gap (last heartbeat on the old VMM's serial
# output to the first on the new one's, both stamped with CLOCK_MONOTONIC
# as they arrive; resolution one heartbeat, 1 ms by default).
# Usage: benches/local_handover.sh [RUNS]   (after `cargo build --example refvmm`)
# Environment: MEM (default 4G), CMDLINE (test guest, default "ws=1 rate=1"),
# BOOT (seconds to let the guest run first, default 1), R (the refvmm binary),
# MODES (default "local tcp").
# Uses a free-ish TCP port 47111 on 127.0.0.1 and a scratch directory.
set -u
R=${R:-$(dirname "$0")/../target/debug/examples/refvmm}
D=$(mktemp -d /tmp/livemig-localbench.XXXXXX); N=${1:-3}
trap 'rm -rf "$D"' EXIT
# The serial stamper (what it writes: benches/serial_stamp.py).
STAMP=$(cat "$(dirname "$0")/serial_stamp.py")
for i in $(seq 1 $N); do
 for mode in ${MODES:-local tcp}; do
  rm -rf $D/*
  $R run --memory ${MEM:-4G} --kernel builtin:testguest --cmdline "${CMDLINE:-ws=1 rate=1}" --api-socket $D/a.sock --memory-backend memfd --serial stdio </dev/null 2>$D/a.err | python3 -c "$STAMP" $D/a.t &
  for t in $(seq 100); do [ -S $D/a.sock ] && [ -e $D/a.t.ready ] && break; sleep 0.05; done
  sleep ${BOOT:-1}
  if [ $mode = local ]; then
    $R receive --listen unix:$D/h.sock --api-socket $D/b.sock --serial stdio </dev/null 2>$D/b.err | python3 -c "$STAMP" $D/b.t &
    for t in $(seq 100); do [ -S $D/h.sock ] && [ -e $D/b.t.ready ] && break; sleep 0.05; done
    $R migrate --api-socket $D/a.sock --local --to unix:$D/h.sock >$D/rep.json 2>$D/m.err
  else
    $R receive --listen tcp:127.0.0.1:47111 --api-socket $D/b.sock --serial stdio --memory-backend memfd </dev/null 2>$D/b.err | python3 -c "$STAMP" $D/b.t &
    sleep 0.5
    for t in $(seq 100); do [ -e $D/b.t.ready ] && break; sleep 0.05; done
    $R migrate --api-socket $D/a.sock --to tcp:127.0.0.1:47111 >$D/rep.json 2>$D/m.err
  fi
  sleep 0.3
  python3 -c "
import socket
s=socket.socket(socket.AF_UNIX);s.connect('$D/b.sock');s.sendall(b'{\"cmd\":\"quit\"}\n');s.recv(100)"
  wait
  python3 -c "
import json
r=json.load(open('$D/rep.json')); b=r['downtime_breakdown']
a=open('$D/a.t').read().split(); d=open('$D/b.t').read().split()
g=(float(d[0])-float(a[1]))*1e3 if a[1]!='None' and d[0]!='None' else None
# A destination beat read before the source's last: a reader ran late.
gap='%.2f ms (source noise floor %.2f ms)' % (g, float(a[2])*1e3) if g is not None and g > 0 else '? (a serial reader ran late)'
print('$mode run $i: downtime %.3f ms (pause %.3f, final sync %.3f, final memory %.3f, state save %.3f, state transfer %.3f [dest restore %.3f], resume ack %.3f [dest resume %.3f]) total %.1f ms setup %.1f ms pages_sent %d; guest switchover gap %s' % (
 r['downtime_ms'], b['pause_ms'], b['final_sync_ms'], b['final_memory_ms'], b['state_save_ms'], b['state_transfer_ms'], b['dest_restore_ms'], b['resume_ack_ms'], b['dest_resume_ms'], r['total_ms'], r['setup_ms'], r['pages_sent'], gap))"
 done
done
