#!/bin/sh
# Lays out the whole root filesystem of a Tutela runtime image under OUT, for a `FROM scratch`
# final stage: the binaries, every shared library they load (their `ldd` closure, at the paths the
# dynamic loader will look for them), extra directories copied whole (libtorch and, for CUDA,
# NVIDIA's libraries, which load parts of themselves with dlopen where ldd cannot see them), the
# fixed non-root user, and the empty mount points. Runs in the build stage only: the image it
# makes has no shell, no package manager and nothing else.
#
#   collect-rootfs.sh OUT BINARY... [-- EXTRA_DIR...]
#
# The image's user is tutela, UID and GID 10001 (a fixed number, so that a volume's owner and a
# Pod's runAsUser/fsGroup can be set to it without looking inside the image).
set -eu

out=$1
shift
bins=""
extra=""
seen_sep=0
for a in "$@"; do
    if [ "$a" = "--" ]; then seen_sep=1; continue; fi
    if [ $seen_sep = 0 ]; then bins="$bins $a"; else extra="$extra $a"; fi
done

mkdir -p "$out/usr/local/bin" "$out/etc" "$out/tmp"
for b in $bins; do
    cp -L "$b" "$out/usr/local/bin/"
done

# Copy a file at its own absolute path (and the file a symlink points at), once.
copy_at_path() {
    f=$1
    [ -e "$out$f" ] && return 0
    mkdir -p "$out$(dirname "$f")"
    cp -L "$f" "$out$f"
}

for d in $extra; do
    mkdir -p "$out$(dirname "$d")"
    cp -a "$d" "$out$d"
done

# The ldd closure of every binary and of every shared library in the extra directories: the
# libraries' own paths, and the loader. `ldd` prints "name => /path (addr)" or "/path (addr)".
targets="$bins"
for d in $extra; do
    targets="$targets $(find "$d" -name '*.so*' -type f)"
done
for t in $targets; do
    ldd "$t" 2>/dev/null | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' |
        while read -r lib; do
            case "$lib" in
                # Inside an extra directory: already copied whole.
                /opt/*) ;;
                *) copy_at_path "$lib" ;;
            esac
        done
done
# What the image holds, for image scanners (Trivy, Grype...) and reviewers: the Debian package
# of every library copied from the build stage, as distroless images record them
# (/var/lib/dpkg/status.d/<package>), and the wheels' metadata (*.dist-info) beside libtorch.
mkdir -p "$out/var/lib/dpkg/status.d"
find "$out" -path "$out/opt" -prune -o -type f -name '*.so*' -print | while read -r lib; do
    path=${lib#"$out"}
    pkg=$(dpkg -S "$path" 2>/dev/null || dpkg -S "$(readlink -f "$path")" 2>/dev/null || true)
    pkg=${pkg%%:*}
    if [ -n "$pkg" ] && [ ! -e "$out/var/lib/dpkg/status.d/$pkg" ]; then
        dpkg -s "$pkg" > "$out/var/lib/dpkg/status.d/$pkg"
    fi
done
for d in $extra; do
    site=$(dirname "$d")
    case "$d" in */torch/lib) site=$(dirname "$site") ;; esac
    for info in "$site"/torch-*.dist-info "$site"/nvidia_*.dist-info; do
        [ -d "$info" ] && [ ! -e "$out$info" ] && mkdir -p "$out$site" && cp -a "$info" "$out$info"
    done
done

# Fail the build, naming it, when a binary needs a library the build stage does not have (an
# image that would only fail at its first start). The NVIDIA driver's own libraries (libcuda,
# libnvidia-*) are the exception: the NVIDIA container toolkit mounts the host's at run time.
for b in $bins; do
    missing=$(ldd "$b" | grep "not found" | grep -v -e 'libcuda\.so' -e 'libnvidia-' || true)
    if [ -n "$missing" ]; then
        echo "collect-rootfs: $b needs a library that is not installed:" >&2
        echo "$missing" >&2
        exit 1
    fi
done

# The user and group (numeric IDs are what the kernel uses; the names are for people and tools).
printf 'tutela:x:10001:10001:Tutela service:/nonexistent:/sbin/nologin\n' > "$out/etc/passwd"
printf 'tutela:x:10001:\n' > "$out/etc/group"
# Name resolution without a shell or NSS modules: glibc reads these; Kubernetes and podman
# mount /etc/hosts and /etc/resolv.conf over the image's.
printf 'hosts: files dns\n' > "$out/etc/nsswitch.conf"
: > "$out/etc/hosts"
: > "$out/etc/resolv.conf"

# Mount points (see docs/deploy.md). Empty in the image; what is written at run time
# goes to the mounted volumes, never to the (read-only) image.
mkdir -p "$out/etc/tutela" "$out/var/lib/tutela" "$out/srv/tutela/data"
chown -R 10001:10001 "$out/var/lib/tutela" "$out/tmp"
chmod 1777 "$out/tmp"
chmod 0700 "$out/var/lib/tutela"
