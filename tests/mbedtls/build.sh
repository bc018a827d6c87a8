#!/usr/bin/env bash
# Builds tests/mbedtls/pipe.c against mbedTLS 2.28 with a 64-byte PSK limit (what Unity's client
# needs for its 64-byte allocation keys; stock builds stop at 32). The mbedTLS source comes from
# the crate registry (the mbedtls-sys-auto crate vendors it). Prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="${CARGO_TARGET_DIR:-$root/target}/mbedtls"
bin="$out/mbedtls-dtls-pipe"
if [[ -x $bin && $bin -nt $here/pipe.c && $bin -nt $here/build.sh ]]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$out/fetch/src"
cat >"$out/fetch/Cargo.toml" <<'EOF'
[package]
name = "mbedtls-source"
version = "0.0.0"
edition = "2021"
publish = false

[workspace]

[dependencies]
mbedtls-sys-auto = "=2.28.15"
EOF
touch "$out/fetch/src/lib.rs"
cargo fetch --quiet --manifest-path "$out/fetch/Cargo.toml" >&2
src=$(cargo metadata --quiet --format-version 1 --manifest-path "$out/fetch/Cargo.toml" |
    python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="mbedtls-sys-auto"))')
vendor="$src/vendor"
[[ -f $vendor/include/mbedtls/ssl.h ]] || { echo "mbedTLS source not found under $src" >&2; exit 1; }
objs="$out/obj"
mkdir -p "$objs"
flags=(-O2 -w -I"$vendor/include" -DMBEDTLS_PSK_MAX_LEN=64)
# Compile the library in parallel, then link.
printf '%s\n' "$vendor"/library/*.c |
    xargs -P "$(nproc)" -I{} sh -c 'cc '"${flags[*]}"' -c "{}" -o "'"$objs"'/$(basename "{}" .c).o"'
cc "${flags[@]}" "$here/pipe.c" "$objs"/*.o -o "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$bin"
