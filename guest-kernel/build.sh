#!/usr/bin/env bash
# Build the Husk guest kernel (an uncompressed, PVH-bootable vmlinux).
#
#   guest-kernel/build.sh [OUT]           build (or take from cache) and copy to OUT
#   guest-kernel/build.sh --check-config  only configure and verify the fragment
#
# OUT defaults to <repo>/target/husk/vmlinux. The result is cached in
# ${HUSK_CACHE:-/var/cache/husk}/kernel-<key>/vmlinux, where <key> is the
# sha256 of config.fragment, patches/*.patch, this script and the installed
# linux-source-6.1 package version; a cached build is copied in well under a second.
#
# Recipe: apply patches/*.patch in name order, `make tinyconfig`, merge
# config.fragment, `make olddefconfig`, verify every option of the fragment
# survived, `make vmlinux`.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$SCRIPT_DIR")
FRAGMENT="$SCRIPT_DIR/config.fragment"
PATCHES=()
for p in "$SCRIPT_DIR"/patches/*.patch; do [[ -f "$p" ]] && PATCHES+=("$p"); done
SELF="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
PACKAGES=(linux-source-6.1 bc flex bison libelf-dev libssl-dev make xz-utils gcc libc6-dev perl patch)

die() { echo "build.sh: error: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

CHECK_ONLY=0
OUT=
for arg in "$@"; do
    case "$arg" in
        --check-config) CHECK_ONLY=1 ;;
        -h|--help) sed -n '2,14p' "$SELF" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option: $arg" ;;
        *) [[ -z "$OUT" ]] || die "more than one OUT given"; OUT=$arg ;;
    esac
done
OUT=${OUT:-$REPO/target/husk/vmlinux}
[[ -f "$FRAGMENT" ]] || die "missing $FRAGMENT"

START=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $START" | awk '{printf "%.1f s", $1 - $2}'; }

# Install what is missing (apt-get update at most once).
pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}
missing=()
for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    log "installing missing packages: ${missing[*]}"
    [[ $EUID -eq 0 ]] || die "packages missing (${missing[*]}) and not root: install them with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
    fi
fi
[[ -f "$SRC_TARBALL" ]] || die "$SRC_TARBALL not found although $SRC_PKG is installed"

SRC_VERSION=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
KEY=$({ cat "$FRAGMENT" "${PATCHES[@]}" "$SELF"; echo "$SRC_PKG=$SRC_VERSION"; } | sha256sum | cut -c1-16)
CACHE_ROOT=${HUSK_CACHE:-/var/cache/husk}
CACHE_DIR="$CACHE_ROOT/kernel-$KEY"
CACHED="$CACHE_DIR/vmlinux"

install_out() {
    mkdir -p "$(dirname "$OUT")" || die "cannot create $(dirname "$OUT")"
    local tmp="$OUT.tmp.$$"
    cp "$CACHED" "$tmp" && mv -f "$tmp" "$OUT" || { rm -f "$tmp"; die "cannot write $OUT"; }
    log "vmlinux ($(stat -c %s "$OUT") bytes) -> $OUT [cache $CACHED] in $(elapsed)"
}

if ((!CHECK_ONLY)) && [[ -f "$CACHED" ]]; then
    install_out
    exit 0
fi

mkdir -p "$CACHE_DIR" 2>/dev/null \
    || die "cannot create $CACHE_DIR (set HUSK_CACHE to a writable directory)"
# One build per key at a time; whoever waits finds the result in the cache.
exec 9>"$CACHE_DIR/lock"
if ! flock -n 9; then
    log "another build of kernel-$KEY is running; waiting for it"
    flock 9
fi
if ((!CHECK_ONLY)) && [[ -f "$CACHED" ]]; then
    install_out
    exit 0
fi
# Leftovers of failed or interrupted builds (we hold the lock).
rm -rf "$CACHE_DIR"/build.*

BUILD_DIR=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
trap 'rc=$?; ((rc == 0)) || [[ ! -d "$BUILD_DIR" ]] || log "failed (status $rc); build tree kept in $BUILD_DIR"' EXIT
log "building kernel-$KEY ($SRC_PKG $SRC_VERSION) in $BUILD_DIR"
tar -C "$BUILD_DIR" -xf "$SRC_TARBALL" || die "cannot extract $SRC_TARBALL"
KSRC="$BUILD_DIR/linux-source-6.1"
[[ -d "$KSRC" ]] || die "unexpected layout in $SRC_TARBALL (no linux-source-6.1/)"
log "source extracted in $(elapsed)"

cd "$KSRC"
for p in "${PATCHES[@]}"; do
    patch -s -p1 <"$p" || die "patch $(basename "$p") does not apply to $SRC_PKG $SRC_VERSION"
done
log "${#PATCHES[@]} patch(es) applied"
export KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk
make -s tinyconfig >/dev/null || die "make tinyconfig failed"
scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >merge.log 2>&1 \
    || { cat merge.log >&2; die "merge_config.sh failed"; }
make -s olddefconfig >>merge.log 2>&1 || { cat merge.log >&2; die "make olddefconfig failed"; }

# Every option the fragment sets must survive olddefconfig unchanged.
bad=()
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        opt=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
        got=$(grep -E "^$opt=" .config | head -n1 | cut -d= -f2- || true)
        [[ "$got" == "$want" ]] || bad+=("$opt (want $want, got ${got:-not set})")
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set ]]; then
        opt=${BASH_REMATCH[1]}
        got=$(grep -E "^$opt=" .config | head -n1 | cut -d= -f2- || true)
        [[ -z "$got" || "$got" == n ]] || bad+=("$opt (want not set, got $got)")
    fi
done <"$FRAGMENT"
if ((${#bad[@]})); then
    printf '  %s\n' "${bad[@]}" >&2
    die "${#bad[@]} fragment option(s) did not survive olddefconfig (missing dependencies?); see $KSRC/.config"
fi
log "config verified ($(grep -c '^CONFIG_.*=y' .config) options =y) in $(elapsed)"

if ((CHECK_ONLY)); then
    cp .config "$CACHE_DIR/config.checked"
    cd / && rm -rf "$BUILD_DIR"
    log "--check-config: OK (final config in $CACHE_DIR/config.checked)"
    exit 0
fi

log "make -j$(nproc) vmlinux (several minutes)"
nice -n 10 make -j"$(nproc)" vmlinux >build.log 2>&1 \
    || { tail -n 40 build.log >&2; die "make vmlinux failed; full log in $KSRC/build.log"; }
[[ -f vmlinux ]] || die "make succeeded but produced no vmlinux"

cp .config "$CACHE_DIR/config.tmp.$$" && mv -f "$CACHE_DIR/config.tmp.$$" "$CACHE_DIR/config"
cp vmlinux "$CACHED.tmp.$$" && mv -f "$CACHED.tmp.$$" "$CACHED"
cd / && rm -rf "$BUILD_DIR"
log "built $CACHED in $(elapsed)"
install_out
