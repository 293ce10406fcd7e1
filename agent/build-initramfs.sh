#!/usr/bin/env bash
# Builds the guest initramfs: /init = static husk-agent, /bin/busybox and its applet links,
# the base directories and a root-only /etc/passwd and /etc/group.
#
# usage: agent/build-initramfs.sh [OUT]   (default <repo>/target/husk/initramfs.cpio)
#
# The archive is an uncompressed newc cpio: decompressing in the nested lab costs more than
# reading the extra bytes. It is rebuilt only when the agent, busybox or this script changed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/target/husk/initramfs.cpio}
target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$repo/target}
agent=$target_dir/$target/guest/husk-agent
busybox=/bin/busybox

log() { echo "build-initramfs: $*" >&2; }

need_tools() {
    local missing=()
    command -v cpio >/dev/null || missing+=(cpio)
    [[ -x $busybox ]] || missing+=(busybox-static)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get install -y "${missing[@]}" >/dev/null
    fi
    if ! file -L "$busybox" | grep -q 'statically linked'; then
        log "$busybox is not static (install busybox-static)"
        exit 1
    fi
}

# There is no musl target here: glibc with crt-static. The explicit --target keeps RUSTFLAGS
# away from proc-macros and build scripts, which must stay dynamic host binaries.
build_agent() {
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --profile guest --quiet -p husk-agent --target "$target")
    if ! file "$agent" | grep -Eq 'statically linked|static-pie linked' ||
        ldd "$agent" 2>&1 | grep -q '=>'; then
        log "$agent is not static:"
        file "$agent" >&2
        exit 1
    fi
}

up_to_date() {
    [[ -f $out && $out -nt $agent && $out -nt $busybox && $out -nt ${BASH_SOURCE[0]} ]]
}

# Fills directory $1 with the initramfs tree.
populate() {
    local root=$1 path dir name
    mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,run,mnt,etc,root}
    chmod 1777 "$root/tmp"
    install -m 0755 "$agent" "$root/init"
    strip --strip-all "$root/init" 2>/dev/null || true
    install -m 0755 "$busybox" "$root/bin/busybox"
    # Every applet as a link in /bin or /sbin (busybox's usr/ paths folded in).
    while read -r path; do
        name=${path##*/}
        [[ $name == busybox ]] && continue
        case $path in *sbin/*) dir=sbin ;; *) dir=bin ;; esac
        [[ -e $root/$dir/$name ]] || ln -s /bin/busybox "$root/$dir/$name"
    done < <("$busybox" --list-full)
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    # The kernel opens /dev/console for init before devtmpfs is mounted; only root can mknod,
    # and the agent copes without it.
    mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null || true
}

# Packs directory $1 into $out with sorted names, fixed times and root ownership.
pack() {
    local root=$1
    find "$root" -exec touch -h -d @0 {} +
    mkdir -p "$(dirname "$out")"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible) >"$out.tmp"
    mv "$out.tmp" "$out"
}

main() {
    need_tools
    build_agent
    if up_to_date; then
        log "$out is up to date"
    else
        # Global, so the EXIT trap still sees it after main returns.
        root=$(mktemp -d "${TMPDIR:-/tmp}/husk-initramfs.XXXXXX")
        trap 'rm -rf "$root"' EXIT
        populate "$root"
        pack "$root"
        log "wrote $out ($(stat -c %s "$out") bytes)"
    fi
    echo "$out"
}

main
