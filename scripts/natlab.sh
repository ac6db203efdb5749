#!/usr/bin/env bash
# NAT test lab: network namespaces, veth pairs, a bridge and iptables NAT, so
# that real peerlink processes connect through real NATs and TURN relays.
#
#   natlab.sh up                 tear down leftovers, then build the lab (mode: $NATLAB_MODE or fullcone)
#   natlab.sh down               stop coturn and every process in the lab, delete its namespaces
#   natlab.sh nat none|fullcone|symmetric
#   natlab.sh link p1|p2|h1|h2|srv|nat1|nat2 down|up
#   natlab.sh udpblock p1|p2 on|off   the node's router drops its UDP but DNS
#                                (a network that allows only TCP out); `nat` clears it
#   natlab.sh exec NODE CMD...   run CMD in namespace PREFIX-NODE
#   natlab.sh coturn start SECRET PORT | coturn stop [PORT]
#   natlab.sh check [MODE...]    self-test (default: every mode), exit 1 on any failure
#   natlab.sh status             namespaces, addresses, NAT mode, coturn instances
#
# Topology (PREFIX = $NATLAB_PREFIX, default plab; every interface lives in a
# lab namespace, none in the namespace natlab.sh is started from):
#
#   PREFIX-pub   bridge br0 = public segment 203.0.113.0/24, ports to-<node>
#   PREFIX-srv   net0 203.0.113.10   signaling server, embedded TURN, coturn
#   PREFIX-h1    net0 203.0.113.31   on the public segment, no NAT
#   PREFIX-h2    net0 203.0.113.32
#   PREFIX-nat1  wan0 203.0.113.21, lan0 10.0.1.1/24, forwarding
#   PREFIX-nat2  wan0 203.0.113.22, lan0 10.0.2.1/24, forwarding
#   PREFIX-p1    net0 10.0.1.2/24, default via 10.0.1.1
#   PREFIX-p2    net0 10.0.2.2/24, default via 10.0.2.1
#
# IPv6 is disabled in every lab namespace so only the IPv4 paths above exist.
# NAT modes (both routers), switched in place; each switch flushes the
# routers' conntrack tables (`conntrack -F`) so no old mapping survives:
#   none       plain routing; the public hosts get routes to 10.0.1/24, 10.0.2/24
#   fullcone   SNAT to the WAN address (source port kept when free) + DNAT of
#              all inbound UDP on the WAN to the inside host: endpoint-
#              independent mapping and filtering
#   symmetric  MASQUERADE --random-fully (a new random port per destination),
#              inbound only for conntrack-established flows, the rest dropped
#
# Needs root, iproute2, iptables, conntrack, iputils-ping, python3, and coturn
# for `coturn` / `check`. State (mode, coturn config/pid/log) lives in
# $NATLAB_RUNDIR (default /tmp/natlab-PREFIX), removed by `down`.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROBES="$HERE/natlab"
P=${NATLAB_PREFIX:-plab}
RUN=${NATLAB_RUNDIR:-/tmp/natlab-$P}
NODES=(pub srv h1 h2 nat1 nat2 p1 p2)
PUB_NET=203.0.113
SRV_IP=$PUB_NET.10

die() { echo "natlab: $*" >&2; exit 1; }
say() { echo "natlab: $*" >&2; }

[[ $P =~ ^[a-z][a-z0-9]{0,11}$ ]] || die "NATLAB_PREFIX must be 1-12 lowercase letters/digits, got '$P'"

if [ -n "${NATLAB_PYTHON:-}" ]; then PY=$NATLAB_PYTHON
elif [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3
else PY=$(command -v python3 || true)
fi

need() {
  [ "$(id -u)" = 0 ] || die "must run as root (it creates network namespaces)"
  local missing=() tool
  for tool in "$@"; do
    case $tool in
      python3) [ -n "$PY" ] || missing+=(python3) ;;
      *) command -v "$tool" >/dev/null || missing+=("$tool") ;;
    esac
  done
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (apt-get install -y iproute2 iptables conntrack iputils-ping coturn python3)"
}

nsx() { local node=$1; shift; ip netns exec "$P-$node" "$@"; }
sysw() { nsx "$1" sh -c "echo $3 > /proc/sys/$2"; }
lab_exists() { ip netns list | awk '{print $1}' | grep -qx "$P-pub"; }
lab_namespaces() {
  local n
  for n in "${NODES[@]}"; do
    if ip netns list | awk '{print $1}' | grep -qx "$P-$n"; then echo "$P-$n"; fi
  done
}

# --- processes ------------------------------------------------------------------

# Stops one process by pid (TERM, then KILL after ~3 s). Only ever called with
# pids this script started or that live in the lab's own namespaces.
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

coturn_stop() { # [PORT]
  local dir pid
  for dir in "$RUN"/coturn-${1:-*}; do
    [ -d "$dir" ] || continue
    # shellcheck disable=SC2013 # one pid per file
    for pid in $(cat "$dir/pid" "$dir/turnserver.pid" 2>/dev/null | sort -u); do
      [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = turnserver ] && stop_pid "$pid"
    done
    rm -rf "$dir"
  done
}

coturn_start() { # SECRET PORT
  need ip turnserver python3
  local secret=$1 port=$2 dir pid i
  [[ $secret =~ ^[A-Za-z0-9._~+=-]{1,128}$ ]] || die "coturn secret: 1-128 of A-Z a-z 0-9 . _ ~ + = -"
  if ! [[ $port =~ ^[0-9]{1,5}$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 49151 ]; then
    die "coturn port must be 1-49151 (relays use 49152-65535)"
  fi
  lab_exists || die "no lab with prefix $P: run 'natlab.sh up' first"
  coturn_stop "$port"
  dir="$RUN/coturn-$port"
  mkdir -p "$dir"
  chmod 700 "$dir"
  sed -e "s|@IP@|$SRV_IP|g" -e "s|@PORT@|$port|g" -e "s|@SECRET@|$secret|g" -e "s|@DIR@|$dir|g" \
    "$PROBES/turnserver.conf.in" >"$dir/turnserver.conf"
  chmod 600 "$dir/turnserver.conf"
  # `ip netns exec` execs, so $! is turnserver's own pid. Output goes to a
  # file so that no caller's pipe is held open by the daemon.
  ip netns exec "$P-srv" turnserver -c "$dir/turnserver.conf" </dev/null >"$dir/stdout.log" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/pid"
  for i in $(seq 50); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$dir/turnserver.log" "$dir/stdout.log" >&2 2>/dev/null || true
      rm -rf "$dir"
      die "coturn exited during startup"
    fi
    if nsx srv "$PY" "$PROBES/stun.py" binding --server "$SRV_IP:$port" --timeout 0.3 >/dev/null 2>&1; then
      say "coturn $(turnserver --version 2>/dev/null | head -n1) listening on $SRV_IP:$port/udp (pid $pid, log $dir/turnserver.log)"
      return 0
    fi
    sleep 0.1
  done
  coturn_stop "$port"
  die "coturn did not answer a STUN Binding on $SRV_IP:$port within 5 s"
}

# --- topology -------------------------------------------------------------------

teardown() {
  local ns pid pids
  coturn_stop
  for ns in $(lab_namespaces); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    for pid in $pids; do stop_pid "$pid" & done
    wait
    ip netns del "$ns" 2>/dev/null || true
  done
  # Nothing is ever created outside the lab namespaces; make sure of it.
  for ns in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^$P-" || true); do
    ip link del "$ns" 2>/dev/null || true
  done
  rm -rf "$RUN"
}

plug() { # NODE IFNAME ADDR/LEN: a veth from the node to the public bridge
  ip -n "$P-pub" link add "to-$1" type veth peer name "$2" netns "$P-$1"
  ip -n "$P-pub" link set "to-$1" master br0 up
  ip -n "$P-$1" addr add "$3" dev "$2"
  ip -n "$P-$1" link set "$2" up
}

lan() { # ROUTER HOST N: the LAN 10.0.N.0/24 between a router and its host
  ip -n "$P-$1" link add lan0 type veth peer name net0 netns "$P-$2"
  ip -n "$P-$1" addr add "10.0.$3.1/24" dev lan0
  ip -n "$P-$1" link set lan0 up
  ip -n "$P-$2" addr add "10.0.$3.2/24" dev net0
  ip -n "$P-$2" link set net0 up
  ip -n "$P-$2" route add default via "10.0.$3.1"
}

cmd_up() {
  need ip iptables conntrack
  local mode=${NATLAB_MODE:-fullcone} n
  teardown
  mkdir -p "$RUN"
  BUILT=0
  trap '[ $BUILT = 1 ] || { say "up failed, tearing down"; teardown; }' EXIT
  for n in "${NODES[@]}"; do
    ip netns add "$P-$n"
    ip -n "$P-$n" link set lo up
    sysw "$n" net/ipv6/conf/default/disable_ipv6 1
    sysw "$n" net/ipv6/conf/all/disable_ipv6 1
  done
  ip -n "$P-pub" link add br0 type bridge stp_state 0 forward_delay 0
  ip -n "$P-pub" link set br0 up
  plug srv net0 "$SRV_IP/24"
  plug h1 net0 "$PUB_NET.31/24"
  plug h2 net0 "$PUB_NET.32/24"
  plug nat1 wan0 "$PUB_NET.21/24"
  plug nat2 wan0 "$PUB_NET.22/24"
  lan nat1 p1 1
  lan nat2 p2 2
  sysw nat1 net/ipv4/ip_forward 1
  sysw nat2 net/ipv4/ip_forward 1
  apply_nat "$mode"
  BUILT=1
  trap - EXIT
  say "lab $P up: $(lab_namespaces | tr '\n' ' ')(nat $mode)"
}

private_routes() { # add|del
  local op=$1 h
  [ "$op" = add ] && op=replace
  for h in srv h1 h2; do
    ip -n "$P-$h" route "$op" 10.0.1.0/24 via "$PUB_NET.21" 2>/dev/null || [ "$1" = del ]
    ip -n "$P-$h" route "$op" 10.0.2.0/24 via "$PUB_NET.22" 2>/dev/null || [ "$1" = del ]
  done
  ip -n "$P-nat1" route "$op" 10.0.2.0/24 via "$PUB_NET.22" 2>/dev/null || [ "$1" = del ]
  ip -n "$P-nat2" route "$op" 10.0.1.0/24 via "$PUB_NET.21" 2>/dev/null || [ "$1" = del ]
}

apply_nat() { # MODE
  local mode=$1 i r wan inside
  case $mode in none | fullcone | symmetric) ;; *) die "nat mode must be none, fullcone or symmetric" ;; esac
  lab_exists || die "no lab with prefix $P: run 'natlab.sh up' first"
  for i in 1 2; do
    r=nat$i wan=$PUB_NET.2$i inside=10.0.$i.2
    nsx "$r" iptables -t nat -F
    nsx "$r" iptables -F
    nsx "$r" iptables -P FORWARD ACCEPT
    case $mode in
      fullcone)
        nsx "$r" iptables -t nat -A POSTROUTING -o wan0 -j SNAT --to-source "$wan"
        nsx "$r" iptables -t nat -A PREROUTING -i wan0 -p udp -j DNAT --to-destination "$inside"
        ;;
      symmetric)
        nsx "$r" iptables -t nat -A POSTROUTING -o wan0 -j MASQUERADE --random-fully
        nsx "$r" iptables -A FORWARD -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        nsx "$r" iptables -A FORWARD -i wan0 -j DROP
        nsx "$r" iptables -A INPUT -i wan0 -p udp -j DROP
        ;;
    esac
    # Mappings made under the previous mode must not outlive it.
    nsx "$r" conntrack -F >/dev/null 2>&1 || die "conntrack -F failed in $P-$r"
  done
  if [ "$mode" = none ]; then private_routes add; else private_routes del; fi
  mkdir -p "$RUN"
  echo "$mode" >"$RUN/mode"
}

cmd_link() { # NODE down|up
  local node=${1:-} state=${2:-} where dev i
  case $node in
    p1) where=nat1 dev=lan0 ;;
    p2) where=nat2 dev=lan0 ;;
    srv | h1 | h2 | nat1 | nat2) where=pub dev=to-$node ;;
    *) die "link: node must be p1, p2, h1, h2, srv, nat1 or nat2" ;;
  esac
  case $state in down | up) ;; *) die "link: state must be down or up" ;; esac
  lab_exists || die "no lab with prefix $P: run 'natlab.sh up' first"
  # The far end of the node's cable: the node keeps its interface, addresses
  # and routes (it only loses carrier), as when a cable is pulled.
  ip -n "$P-$where" link set dev "$dev" "$state"
  if [ "$state" = up ]; then
    local ifname=net0
    case $node in nat1 | nat2) ifname=wan0 ;; esac
    for i in $(seq 50); do
      ip -n "$P-$node" link show "$ifname" | grep -q LOWER_UP && return 0
      sleep 0.05
    done
    die "link $node: no carrier on $ifname after up"
  fi
}

cmd_udpblock() { # NODE on|off
  local node=${1:-} state=${2:-} r
  case $node in p1) r=nat1 ;; p2) r=nat2 ;; *) die "udpblock: node must be p1 or p2" ;; esac
  lab_exists || die "no lab with prefix $P: run 'natlab.sh up' first"
  local rule=(FORWARD -i lan0 -p udp ! --dport 53 -j DROP)
  case $state in
    on) nsx "$r" iptables -C "${rule[@]}" 2>/dev/null || nsx "$r" iptables -I "${rule[@]}" ;;
    off) while nsx "$r" iptables -D "${rule[@]}" 2>/dev/null; do :; done ;;
    *) die "udpblock: state must be on or off" ;;
  esac
  # Flows that were allowed must not outlive the rule.
  nsx "$r" conntrack -F >/dev/null 2>&1 || true
}

cmd_status() {
  lab_exists || { echo "no lab with prefix $P"; return 0; }
  echo "namespaces: $(lab_namespaces | tr '\n' ' ')"
  echo "nat mode: $(cat "$RUN/mode" 2>/dev/null || echo unknown)"
  local dir
  for dir in "$RUN"/coturn-*; do
    [ -d "$dir" ] && echo "coturn: port ${dir##*-} pid $(cat "$dir/pid")"
  done
  for n in "${NODES[@]}"; do
    echo "$P-$n: $(ip -n "$P-$n" -br -4 addr show | awk '$1 != "lo" {print $1, $2, $3}' | tr '\n' ' ')"
  done
}

# --- check ------------------------------------------------------------------------

PASSED=0 FAILED=0
CHECK_PIDS=()
result() { # OK(0|1) DESCRIPTION
  if [ "$1" = 1 ]; then PASSED=$((PASSED + 1)); echo "PASS  $2"
  else FAILED=$((FAILED + 1)); echo "FAIL  $2"; fi
}

bg_in() { # NODE OUTFILE CMD...: starts CMD in NODE, records its pid
  local node=$1 out=$2; shift 2
  ip netns exec "$P-$node" "$@" </dev/null >"$out" 2>&1 &
  CHECK_PIDS+=($!)
}

wait_line() { # FILE: waits up to 5 s for a first line
  local i
  for i in $(seq 100); do
    [ -s "$1" ] && return 0
    sleep 0.05
  done
  return 1
}

pings() { # NODE TARGET: 1 if an ICMP echo gets through within 3 tries
  local i
  for i in 1 2 3; do
    nsx "$1" ping -n -q -c1 -W1 "$2" >/dev/null 2>&1 && { echo 1; return; }
  done
  echo 0
}

check_reach() {
  local mode=$1 want
  result "$(pings srv $PUB_NET.31)" "[$mode] srv -> h1 (public segment)"
  result "$(pings h1 $PUB_NET.32)" "[$mode] h1 -> h2"
  result "$(pings h2 $PUB_NET.21)" "[$mode] h2 -> nat1 WAN"
  result "$(pings p1 10.0.1.1)" "[$mode] p1 -> nat1 LAN"
  result "$(pings p2 10.0.2.1)" "[$mode] p2 -> nat2 LAN"
  result "$(pings p1 $SRV_IP)" "[$mode] p1 -> srv through nat1"
  result "$(pings p2 $SRV_IP)" "[$mode] p2 -> srv through nat2"
  if [ "$mode" = none ]; then want=1; else want=0; fi
  [ "$(nsx p1 ping -n -q -c1 -W1 10.0.2.2 >/dev/null 2>&1 && echo 1 || echo 0)" = $want ] && ok=1 || ok=0
  result $ok "[$mode] p1 -> p2's private 10.0.2.2 $([ $want = 1 ] && echo routed || echo unreachable)"
}

# The NAT behaviour of one router, seen from its inside host: one socket asks
# three STUN servers (coturn srv:$CT_PORT, python srv:$CT_PORT+1, python
# h1:3478) for its mapped address; then h2, which that socket never
# contacted, sends to the first mapped address.
check_nat() { # MODE HOST WAN_IP INSIDE_IP
  local mode=$1 host=$2 wan=$3 inside=$4 out="$RUN/check/binding-$2.out" knock
  local servers=("$SRV_IP:$CT_PORT" "$SRV_IP:$((CT_PORT + 1))" "$PUB_NET.31:3478")
  bg_in "$host" "$out" "$PY" "$PROBES/stun.py" binding --timeout 2 --wait-unsolicited 2 --reply pong \
    --server "${servers[0]}" --server "${servers[1]}" --server "${servers[2]}"
  if ! wait_line "$out"; then
    result 0 "[$mode] $host: STUN probe printed nothing"
    return
  fi
  local mapped
  mapped=$("$PY" -c 'import json,sys; d=json.loads(open(sys.argv[1]).readline()); print(d["local"], *[m["mapped"] or "-" for m in d["mapped"]])' "$out")
  # shellcheck disable=SC2086
  set -- $mapped
  local local_addr=$1 m1=$2 m2=$3 m3=$4
  echo "      $host local $local_addr -> mapped ${servers[0]}: $m1, ${servers[1]}: $m2, ${servers[2]}: $m3"
  if [ "$m1" = - ] || [ "$m2" = - ] || [ "$m3" = - ]; then
    result 0 "[$mode] $host: every STUN server answered"
    return
  fi
  local want_ip=$wan
  [ "$mode" = none ] && want_ip=$inside
  [ "${m1%:*}" = "$want_ip" ] && [ "${m2%:*}" = "$want_ip" ] && [ "${m3%:*}" = "$want_ip" ] && ok=1 || ok=0
  result $ok "[$mode] $host: servers see it as $want_ip"
  case $mode in
    none | fullcone)
      [ "$m1" = "$m2" ] && [ "$m2" = "$m3" ] && ok=1 || ok=0
      result $ok "[$mode] $host: mapping is endpoint-independent (same $m1 toward 3 destinations)"
      ;;
    symmetric)
      [ "$m1" != "$m2" ] && [ "$m2" != "$m3" ] && [ "$m1" != "$m3" ] && ok=1 || ok=0
      result $ok "[$mode] $host: mapping is endpoint-dependent (3 destinations, 3 ports: ${m1#*:} ${m2#*:} ${m3#*:})"
      ;;
  esac
  knock=$(nsx h2 "$PY" "$PROBES/udp.py" send --to "$m1" --data knock --wait 1)
  wait "${CHECK_PIDS[-1]}" || true
  local got
  got=$("$PY" -c 'import json,sys; l=open(sys.argv[1]).read().splitlines(); u=json.loads(l[1])["unsolicited"] if len(l) > 1 else None; print("none" if u is None else ",".join(x["from"] + "=" + x["data"] for x in u) or "nothing")' "$out")
  local reply
  reply=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["reply"])' "$knock")
  echo "      h2 -> $m1 unsolicited: inside received [$got], h2 got reply [$reply]"
  case $mode in
    none | fullcone)
      [[ $got == $PUB_NET.32:*=knock* ]] && [ "$reply" = pong ] && ok=1 || ok=0
      result $ok "[$mode] $host: unsolicited UDP from a third host (h2) reaches it, and its answer gets back"
      ;;
    symmetric)
      [ "$got" = nothing ] && [ "$reply" = None ] && ok=1 || ok=0
      result $ok "[$mode] $host: unsolicited UDP from a third host (h2) is dropped"
      ;;
  esac
}

check_turn() { # MODE HOST
  local mode=$1 host=$2 out parsed ok rest any=0
  out=$(nsx "$host" "$PY" "$PROBES/stun.py" turn --server "$SRV_IP:$CT_PORT" --secret "$CT_SECRET" \
    --echo "$PUB_NET.31:7000" --denied 10.0.2.2:7000 --denied 127.0.0.1:7000 --denied 198.51.100.1:7000 2>&1) || true
  parsed=$("$PY" -c 'import json, sys
for line in sys.stdin.read().splitlines():
    try:
        d = json.loads(line)
        print("%d %s (%s)" % (d["ok"], d["check"], d["detail"]))
    except (ValueError, KeyError):
        print("0 unexpected probe output: " + line)' <<<"$out")
  while read -r ok rest; do
    [ -n "$ok" ] || continue
    any=1
    result "$ok" "[$mode] $host: coturn $rest"
  done <<<"$parsed"
  [ $any = 1 ] || result 0 "[$mode] $host: coturn TURN probe said nothing"
}

check_link() {
  local node
  for node in p1 h1; do
    local target=$SRV_IP ifname=net0
    cmd_link "$node" down
    result "$([ "$(pings "$node" "$target")" = 0 ] && echo 1 || echo 0)" "link $node down: $node cannot reach srv"
    ip -n "$P-$node" -4 addr show "$ifname" | grep -q 'inet ' && ok=1 || ok=0
    if [ "$node" = p1 ]; then
      ip -n "$P-$node" route show default | grep -q 'via 10.0.1.1' || ok=0
    fi
    result $ok "link $node down: its interface keeps its address$([ "$node" = p1 ] && echo ' and default route')"
    cmd_link "$node" up
    result "$(pings "$node" "$target")" "link $node up: $node reaches srv again"
  done
}

cmd_check() {
  need ip iptables conntrack ping turnserver python3
  lab_exists || die "no lab with prefix $P: run 'natlab.sh up' first"
  local modes=("$@") mode
  [ ${#modes[@]} -gt 0 ] || modes=(fullcone symmetric none)
  CHECK_PREV=$(cat "$RUN/mode" 2>/dev/null || echo fullcone)
  CT_PORT=${NATLAB_CHECK_PORT:-3490}
  CT_SECRET=check-$RANDOM$RANDOM
  # shellcheck disable=SC2317
  cleanup_check() {
    local pid
    for pid in "${CHECK_PIDS[@]}"; do stop_pid "$pid"; done
    coturn_stop "$CT_PORT"
    rm -rf "$RUN/check"
    apply_nat "$CHECK_PREV" || true
  }
  trap cleanup_check EXIT
  mkdir -p "$RUN/check"
  coturn_start "$CT_SECRET" "$CT_PORT"
  bg_in srv "$RUN/check/stun-srv.out" "$PY" "$PROBES/stun.py" serve --bind "$SRV_IP:$((CT_PORT + 1))"
  bg_in h1 "$RUN/check/stun-h1.out" "$PY" "$PROBES/stun.py" serve --bind "$PUB_NET.31:3478"
  bg_in h1 "$RUN/check/echo-h1.out" "$PY" "$PROBES/udp.py" echo --bind "$PUB_NET.31:7000"
  local f
  for f in stun-srv stun-h1 echo-h1; do
    wait_line "$RUN/check/$f.out" || die "probe server $f did not start: $(cat "$RUN/check/$f.out")"
  done
  ok=1
  for n in "${NODES[@]}"; do
    [ -z "$(ip -n "$P-$n" -6 addr show 2>/dev/null)" ] || ok=0
  done
  result $ok "no IPv6 address in any lab namespace"
  for mode in "${modes[@]}"; do
    apply_nat "$mode"
    echo "== nat $mode"
    check_reach "$mode"
    check_nat "$mode" p1 "$PUB_NET.21" 10.0.1.2
    check_nat "$mode" p2 "$PUB_NET.22" 10.0.2.2
    check_turn "$mode" p1
  done
  echo "== link"
  apply_nat "$CHECK_PREV"
  check_link
  echo "natlab check ($P): $PASSED checks passed, $FAILED failed"
  [ "$FAILED" = 0 ]
}

# --- main -------------------------------------------------------------------------

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  up) cmd_up ;;
  down) need ip; teardown; say "lab $P down" ;;
  nat) need ip iptables conntrack; [ $# = 1 ] || die "usage: natlab.sh nat none|fullcone|symmetric"; apply_nat "$1"; say "nat $1" ;;
  link) need ip; [ $# = 2 ] || die "usage: natlab.sh link NODE down|up"; cmd_link "$1" "$2" ;;
  udpblock) need ip iptables conntrack; [ $# = 2 ] || die "usage: natlab.sh udpblock p1|p2 on|off"; cmd_udpblock "$1" "$2" ;;
  exec)
    [ $# -ge 2 ] || die "usage: natlab.sh exec NODE CMD..."
    node=$1; shift
    exec ip netns exec "$P-$node" "$@"
    ;;
  coturn)
    case ${1:-} in
      start) [ $# = 3 ] || die "usage: natlab.sh coturn start SECRET PORT"; coturn_start "$2" "$3" ;;
      stop) [ $# -le 2 ] || die "usage: natlab.sh coturn stop [PORT]"; coturn_stop "${2:-}" ;;
      *) die "usage: natlab.sh coturn start SECRET PORT | coturn stop [PORT]" ;;
    esac
    ;;
  check) cmd_check "$@" ;;
  status) cmd_status ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
