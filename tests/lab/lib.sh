# Shared by tests/lab/run and tests/lab/setup (sourced, bash).
#
# Builds and locates the lab cache:
#   ${HUSK_CACHE:-/var/cache/husk}/lab-<hash>/
#     vmlinuz          Debian's stock kernel (linux-image-amd64's current 6.1 package; hard link)
#     vmlinux          the same, uncompressed ELF, booted through its PVH entry (4 s faster)
#     initrd.cpio      busybox-static + tests/lab/init + the modules it loads (cpio newc, uncompressed)
#     modules ->       ../lab-kernel-<ver>/lib/modules: the package's whole module tree, plain .ko,
#                      with a busybox modules.dep; bind-mounted at /lib/modules/<kver> in the lab,
#                      where `modprobe` (busybox, if the host has none) and kernel autoload use it
#     kernel-version   <kver>   (uname -r inside the lab)
#     manifest         what went in (package, version, module load order)
#     ok               written last
# <hash> covers the files in tests/lab/ (not *.md), the kernel package and version, and busybox.
# ${HUSK_CACHE:-/var/cache/husk}/lab-kernel-<ver>/ holds the extracted package (about 400 MB),
# shared by every lab-<hash> built from the same package version.

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_CACHE_ROOT=${HUSK_CACHE:-/var/cache/husk}

# Modules the lab loads at boot (dependencies are resolved and prepended automatically).
# Others (veth, bridge, nf_tables...) load on demand: `modprobe X` or kernel autoload.
# vhost_vsock: `husk bench boot` gives QEMU a vsock device only where /dev/vhost-vsock exists.
LAB_MODULES=(virtio_mmio virtio_pci virtio_console 9p 9pnet_virtio overlay kvm_amd tun loop vhost_vsock)

lab_die() { echo "lab: $*" >&2; exit 125; }
lab_log() { [ -n "${LAB_QUIET:-}" ] || echo "lab: $*" >&2; }

# Install the host tools the lab needs, if missing.
lab_host_tools() {
    local pkgs=()
    command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
        || pkgs+=(busybox-static)
    command -v cpio >/dev/null || pkgs+=(cpio)
    command -v flock >/dev/null && command -v setpriv >/dev/null || pkgs+=(util-linux)
    if [ ${#pkgs[@]} -gt 0 ]; then
        lab_log "installing ${pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >&2 \
            || lab_die "apt-get install ${pkgs[*]} failed"
    fi
}

# Sets LAB_KPKG and LAB_KPKG_VERSION: the kernel package linux-image-amd64 currently points to.
# apt-cache takes a second or two, so the answer is remembered until the apt lists change.
lab_kernel_pkg() {
    local memo=$LAB_CACHE_ROOT/.lab-kernel-pkg stamp
    stamp="${LAB_KERNEL_PKG:-} $(stat -c %Y /var/lib/apt/lists /var/cache/apt/pkgcache.bin 2>/dev/null | tr '\n' ' ')"
    if [ -f "$memo" ] && [ "$(sed -n 1p "$memo")" = "$stamp" ]; then
        LAB_KPKG=$(sed -n 2p "$memo"); LAB_KPKG_VERSION=$(sed -n 3p "$memo")
        [ -n "$LAB_KPKG" ] && [ -n "$LAB_KPKG_VERSION" ] && return 0
    fi
    if [ -n "${LAB_KERNEL_PKG:-}" ]; then
        LAB_KPKG=$LAB_KERNEL_PKG
    else
        LAB_KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null \
            | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
        [ -n "$LAB_KPKG" ] || lab_die "cannot resolve linux-image-amd64 (run apt-get update?)"
    fi
    LAB_KPKG_VERSION=$(apt-cache show --no-all-versions "$LAB_KPKG" 2>/dev/null \
        | sed -n 's/^Version: //p' | head -n1)
    [ -n "$LAB_KPKG_VERSION" ] || lab_die "apt-cache knows no version of $LAB_KPKG"
    mkdir -p "$LAB_CACHE_ROOT" 2>/dev/null \
        && printf '%s\n' "$stamp" "$LAB_KPKG" "$LAB_KPKG_VERSION" > "$memo.$$" \
        && mv "$memo.$$" "$memo"
}

# Sets LAB_CACHE: the cache directory for the current scripts and kernel.
lab_cache_dir() {
    lab_kernel_pkg
    local h bb
    bb=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo none)
    h=$( { (cd "$LAB_DIR" && for f in $(ls | grep -v '\.md$' | sort); do
               [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done)
           echo "kernel $LAB_KPKG $LAB_KPKG_VERSION"; echo "busybox $bb"; } \
         | sha256sum | cut -c1-16)
    LAB_CACHE=$LAB_CACHE_ROOT/lab-$h
}

# Prints the module load order (file paths relative to the module dir) for LAB_MODULES.
# Reads each module's "depends=" from its .modinfo strings; no depmod/modinfo needed.
lab_module_order() {
    local moddir=$1
    declare -gA LAB_MODPATH=()
    declare -gA LAB_SEEN=()
    LAB_ORDER=()
    local f n
    while IFS= read -r f; do
        n=${f##*/}; n=${n%.ko}; n=${n//-/_}
        LAB_MODPATH[$n]=$f
    done < <(cd "$moddir" && find kernel -name '*.ko' | sort)
    for n in "${LAB_MODULES[@]}"; do lab_module_visit "$moddir" "$n"; done
}
lab_module_visit() {
    local moddir=$1 n=${2//-/_} deps d
    [ -n "${LAB_SEEN[$n]:-}" ] && return 0
    LAB_SEEN[$n]=1
    local f=${LAB_MODPATH[$n]:-}
    if [ -z "$f" ]; then
        # Built into the kernel? Then there is nothing to load.
        grep -q "/$n.ko" "$moddir/modules.builtin" 2>/dev/null && return 0
        lab_die "module $n not found in the kernel package"
    fi
    deps=$(tr '\0' '\n' < "$moddir/$f" | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do lab_module_visit "$moddir" "$d"; done
    LAB_ORDER+=("$f")
}

# Extracts the kernel package once per package version into
# $LAB_CACHE_ROOT/lab-kernel-<version>/ (vmlinuz, lib/modules/<kver>/ with plain .ko files and
# a busybox modules.dep, kernel-version). Sets LAB_KDIR. Called with the cache lock held.
lab_build_kernel() {
    LAB_KDIR=$LAB_CACHE_ROOT/lab-kernel-${LAB_KPKG#linux-image-}_${LAB_KPKG_VERSION//[^A-Za-z0-9.+-]/_}
    if [ -f "$LAB_KDIR/ok" ]; then
        # Directories built before vmlinux extraction existed get it now.
        if [ ! -f "$LAB_KDIR/vmlinux" ] && [ ! -f "$LAB_KDIR/no-vmlinux" ]; then
            if lab_extract_vmlinux "$LAB_KDIR/vmlinuz" "$LAB_KDIR/vmlinux.tmp.$$"; then
                mv "$LAB_KDIR/vmlinux.tmp.$$" "$LAB_KDIR/vmlinux"
            else
                rm -f "$LAB_KDIR/vmlinux.tmp.$$"
                touch "$LAB_KDIR/no-vmlinux"
            fi
        fi
        return 0
    fi
    local tmp=$LAB_KDIR.tmp.$$
    rm -rf "$tmp" "$LAB_KDIR"
    mkdir -p "$tmp/dl" "$tmp/x"
    chmod 777 "$tmp/dl"  # apt-get download runs as _apt when it can
    (cd "$tmp/dl" && apt-get download -q "$LAB_KPKG=$LAB_KPKG_VERSION" 2>&1 \
        | grep -v -e '^W: Download is performed unsandboxed' -e '^Get:' -e '^Fetched' >&2; \
        exit "${PIPESTATUS[0]}") || lab_die "apt-get download $LAB_KPKG failed"
    dpkg-deb -x "$tmp"/dl/*.deb "$tmp/x" || lab_die "dpkg-deb -x failed"
    local kver
    kver=$(ls "$tmp/x/lib/modules" | head -n1)
    [ -n "$kver" ] && [ -f "$tmp/x/boot/vmlinuz-$kver" ] || lab_die "unexpected package layout"
    mv "$tmp/x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
    mkdir -p "$tmp/lib/modules"
    mv "$tmp/x/lib/modules/$kver" "$tmp/lib/modules/$kver"
    # The uncompressed ELF boots through its PVH entry (QEMU -kernel), which skips the
    # decompressor: about 4 s less per boot under TCG. Without it, vmlinuz is used.
    lab_extract_vmlinux "$tmp/vmlinuz" "$tmp/vmlinux" \
        || { rm -f "$tmp/vmlinux"; touch "$tmp/no-vmlinux"; lab_log "warning: no PVH vmlinux, booting vmlinuz"; }
    rm -rf "$tmp/x" "$tmp/dl"
    local md=$tmp/lib/modules/$kver
    # busybox insmod handles plain .ko only: decompress compressed modules once, here.
    if find "$md" -name '*.ko.xz' | grep -q .; then
        lab_log "decompressing .ko.xz modules"
        find "$md" -name '*.ko.xz' -print0 | xargs -0 -r -P2 -n64 xz -d
    fi
    if find "$md" -name '*.ko.zst' | grep -q .; then
        lab_log "decompressing .ko.zst modules"
        find "$md" -name '*.ko.zst' -print0 | xargs -0 -r -P2 -n64 zstd -q -d --rm
    fi
    if find "$md" -name '*.ko.gz' | grep -q .; then
        find "$md" -name '*.ko.gz' -print0 | xargs -0 -r -P2 -n64 gzip -d
    fi
    # modules.dep for `modprobe` (busybox) inside the lab; boot itself does not need it.
    /bin/busybox depmod -b "$tmp" "$kver" || lab_log "warning: busybox depmod failed"
    echo "$kver" > "$tmp/kernel-version"
    echo "$LAB_KPKG $LAB_KPKG_VERSION" > "$tmp/package"
    touch "$tmp/ok"
    mv "$tmp" "$LAB_KDIR"
}

# Extracts the ELF vmlinux from a bzImage; fails unless it has a PVH entry note.
lab_extract_vmlinux() {
    python3 - "$1" "$2" <<'PY'
import gzip, lzma, struct, sys, zlib
data = open(sys.argv[1], "rb").read()
def elf_has_pvh(e):
    # ELF64 program headers: find PT_NOTE segments, look for a "Xen" note of type 18
    # (XEN_ELFNOTE_PHYS32_ENTRY), which is what QEMU needs to boot the ELF directly.
    if e[:4] != b"\x7fELF" or e[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", e, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", e, 0x36)
    for i in range(phnum):
        ptype, = struct.unpack_from("<I", e, phoff + i * phentsize)
        if ptype != 4:
            continue
        off, = struct.unpack_from("<Q", e, phoff + i * phentsize + 8)
        size, = struct.unpack_from("<Q", e, phoff + i * phentsize + 32)
        p, end = off, off + size
        while p + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", e, p)
            name = e[p + 12:p + 12 + namesz]
            if name.rstrip(b"\0") == b"Xen" and ntype == 18:
                return True
            p += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False
def tries():
    i = data.find(b"\xfd7zXZ\x00")
    if i >= 0:
        yield lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[i:])
    j = data.find(b"\x1f\x8b\x08")
    if j >= 0:
        yield lambda: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[j:])
for t in tries():
    try:
        out = t()
    except Exception:
        continue
    if elf_has_pvh(out):
        open(sys.argv[2], "wb").write(out)
        sys.exit(0)
sys.exit(1)
PY
}

# Builds $LAB_CACHE if it is not there yet (atomically, under a lock).
lab_build_cache() {
    [ -f "$LAB_CACHE/ok" ] && return 0
    lab_host_tools
    mkdir -p "$LAB_CACHE_ROOT"
    exec {lockfd}>"$LAB_CACHE_ROOT/.lab.lock"
    flock "$lockfd"
    if [ -f "$LAB_CACHE/ok" ]; then exec {lockfd}>&-; return 0; fi
    lab_log "building $LAB_CACHE ($LAB_KPKG $LAB_KPKG_VERSION)"
    local t0=$SECONDS
    lab_build_kernel
    local tmp=$LAB_CACHE.tmp.$$
    rm -rf "$tmp" "$LAB_CACHE"
    mkdir -p "$tmp"
    local kver
    kver=$(cat "$LAB_KDIR/kernel-version")
    local md=$LAB_KDIR/lib/modules/$kver
    local k
    for k in vmlinuz vmlinux; do
        [ -f "$LAB_KDIR/$k" ] || continue
        ln "$LAB_KDIR/$k" "$tmp/$k" 2>/dev/null || cp "$LAB_KDIR/$k" "$tmp/$k"
    done
    ln -s "../${LAB_KDIR##*/}/lib/modules" "$tmp/modules"
    lab_module_order "$md"
    local ird=$tmp/initrd
    mkdir -p "$ird"/{bin,dev,proc,sys,mnt,newroot,modules}
    cp /bin/busybox "$ird/bin/busybox"
    ln -s busybox "$ird/bin/sh"
    cp "$LAB_DIR/init" "$ird/init"
    chmod 755 "$ird/init"
    local i=0 f
    : > "$ird/modules/order"
    for f in "${LAB_ORDER[@]}"; do
        i=$((i + 1))
        local dst
        dst=$(printf '%02d-%s' "$i" "${f##*/}")
        cp "$md/$f" "$ird/modules/$dst"
        echo "$dst" >> "$ird/modules/order"
    done
    (cd "$ird" && find . | sort | cpio -o -H newc --quiet -R 0:0) > "$tmp/initrd.cpio" \
        || lab_die "cpio failed"
    rm -rf "$ird"
    echo "$kver" > "$tmp/kernel-version"
    {
        echo "package $LAB_KPKG $LAB_KPKG_VERSION"
        echo "kernel $kver"
        echo "busybox $(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null)"
        echo "modules ${LAB_ORDER[*]}"
        echo "built $(date -u +%FT%TZ)"
    } > "$tmp/manifest"
    touch "$tmp/ok"
    mv "$tmp" "$LAB_CACHE"
    exec {lockfd}>&-
    lab_log "cache ready in $((SECONDS - t0)) s: $LAB_CACHE"
}
