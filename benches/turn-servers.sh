# The TURN servers the benchmarks compare against, started the same way everywhere. Sourced by
# benches/compare.sh and benches/xdp.sh.
#
#   start_coturn IP CPU OUT [PREFIX…]   # PREFIX: e.g. ip netns exec NS; sets PID
#   start_turnrs IP CPU OUT [PREFIX…]   # sets PID
# coturn listens on IP:13478 and relays from ports 40000–45000; turn-rs on IP:13479, 45001–49000.

start_coturn() {
  local ip=$1 cpu=$2 out=$3
  shift 3
  command -v turnserver >/dev/null || return 1
  rm -f "$out/coturn.pid"
  "$@" taskset -c "$cpu" turnserver -n --listening-ip="$ip" --listening-port=13478 --relay-ip="$ip" \
    --min-port=40000 --max-port=45000 --lt-cred-mech --user=ferry:ferry --realm=ferry --no-tls --no-dtls \
    --allow-loopback-peers --no-cli --no-stdout-log --log-file=/dev/null --pidfile="$out/coturn.pid" >/dev/null 2>&1 &
  for _ in $(seq 50); do [ -s "$out/coturn.pid" ] && break; sleep 0.1; done
  PID=$(cat "$out/coturn.pid")
}

start_turnrs() {
  local ip=$1 cpu=$2 out=$3
  shift 3
  command -v turn-server >/dev/null || return 1
  cat > "$out/turn-rs.toml" <<TOML
[server]
realm = "ferry"
max-threads = 1
port-range = "45001..49000"
[[server.interfaces]]
transport = "udp"
listen = "$ip:13479"
external = "$ip:13479"
idle-timeout = 20
mtu = 1500
[log]
level = "error"
stdout = true
[auth.static-credentials]
ferry = "ferry"
TOML
  "$@" taskset -c "$cpu" turn-server --config "$out/turn-rs.toml" >/dev/null 2>&1 &
  PID=$!
}
