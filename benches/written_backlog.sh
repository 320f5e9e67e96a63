#!/bin/bash
# One migration of a 2 GiB guest that wrote 1 GiB (ws=1024 laps=1) at a 10 ms limit.
# SRC / DST: refvmm binaries of the source and destination; RB: --receive-buffer of the
# destination (empty = default); NICE: the destination's nice; BUSY=1: a busy loop beside it.
SRC=${SRC:?}; DST=${DST:?}; D=/tmp/rq2; rm -rf $D; mkdir -p $D
$SRC run --memory 2G --vcpus 1 --kernel builtin:testguest --cmdline "ws=1024 rate=max laps=1 fresh=1" --api-socket $D/a.sock --serial file:$D/a.ser </dev/null 2>$D/a.err &
for i in $(seq 120); do sleep 0.5; grep -aq "^T [0-9]* 262144 " $D/a.ser && break; done
nice -n ${NICE:-0} $DST receive --listen tcp:127.0.0.1:47997 --memory 2G ${RB:+--receive-buffer $RB} --api-socket $D/b.sock --serial file:$D/b.ser </dev/null 2>$D/b.err &
sleep 1
if [ -n "${BUSY:-}" ]; then ( while :; do :; done ) & BP=$!; fi
timeout 300 $SRC migrate --api-socket $D/a.sock --to tcp:127.0.0.1:47997 --downtime-limit-ms 10 > $D/rep.json 2>$D/m.err
[ -n "${BP:-}" ] && { kill $BP; wait $BP 2>/dev/null; }
python3 -c "
import json;r=json.load(open('$D/rep.json'));b=r['downtime_breakdown']
print('total %.0f dt %.2f exp %.2f st %.2f rounds %d unread %s' % (r['total_ms'],r['downtime_ms'],r['expected_downtime_ms'],b['state_transfer_ms'],len(r['rounds']),[x.get('unread_bytes') for x in r['rounds']]))" || tail -3 $D/m.err
sleep 0.5
grep -a "CORRUPT" $D/b.ser | head -2
python3 -c "
import socket
for s in ['$D/b.sock','$D/a.sock']:
  try:
    c=socket.socket(socket.AF_UNIX);c.connect(s);c.sendall(b'{\"cmd\":\"quit\"}\n');c.recv(100)
  except Exception: pass"
sleep 0.5; pkill -f -- "--api-socket $D/"; wait
