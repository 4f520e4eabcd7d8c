#!/usr/bin/env bash
# Runs the README's two commands as a newcomer would: in a throwaway Debian bookworm chroot
# (debootstrap --variant=minbase, nothing else installed), on a clean clone of this
# repository's HEAD with ../shared beside it, as root, with an empty environment except HOME,
# PATH and the certificate and pip settings this host needs to reach the package registries.
#
#   scripts/fresh-machine-check.sh [--keep] [--rebuild-base] [COMMAND ...]
#
# COMMAND defaults to the README's two commands ("./dev.sh demo" then "./dev.sh test"); each
# is timed. The pristine minbase is cached as a tarball in $FRESH_DIR (default
# /var/tmp/pixelrefine-fresh) and unpacked anew for every run; --rebuild-base makes it again.
# --keep leaves the used chroot in place for inspection. Needs root, network access to
# deb.debian.org and PyPI, and a few GB of disk. Takes minutes: not part of CI.
set -euo pipefail

keep=0
rebuild=0
commands=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1 ;;
    --rebuild-base) rebuild=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) commands+=("$1") ;;
  esac
  shift
done
[ ${#commands[@]} -gt 0 ] || commands=("./dev.sh demo" "./dev.sh test")

say() { printf 'fresh-machine-check: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot and mounts need it)"
for tool in git unshare chroot mount tar apt-get dpkg; do
  command -v "$tool" >/dev/null || die "missing '$tool' on this host"
done

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
shared="$repo/../shared"
work=${FRESH_DIR:-/var/tmp/pixelrefine-fresh}
base="$work/bookworm-minbase.tar"
mkdir -p "$work"

# debootstrap need not be installed: a copy unpacked from its Debian package runs as it is.
debootstrap=$(command -v debootstrap || true)
if [ -z "$debootstrap" ]; then
  if [ ! -x "$work/debootstrap/usr/sbin/debootstrap" ]; then
    say "fetching debootstrap (apt-get download + dpkg -x)"
    rm -rf "$work/debootstrap" && mkdir -p "$work/debootstrap"
    (cd "$work/debootstrap" && apt-get download -q debootstrap >/dev/null 2>&1 && dpkg -x debootstrap_*.deb .) || die "could not fetch debootstrap with apt-get download"
  fi
  export DEBOOTSTRAP_DIR="$work/debootstrap/usr/share/debootstrap"
  debootstrap="$work/debootstrap/usr/sbin/debootstrap"
fi

if [ "$rebuild" -eq 1 ] || [ ! -f "$base" ]; then
  say "making a pristine bookworm minbase (debootstrap, a few minutes)"
  rm -rf "$work/base-root" && mkdir -p "$work/base-root"
  "$debootstrap" --variant=minbase bookworm "$work/base-root" http://deb.debian.org/debian \
    > "$work/debootstrap.log" 2>&1 || die "debootstrap failed; see $work/debootstrap.log"
  tar -C "$work/base-root" -cf "$base.tmp" . && mv "$base.tmp" "$base"
  rm -rf "$work/base-root"
fi

root="$work/root-$$"
cleanup() {
  if [ "$keep" -eq 0 ]; then rm -rf --one-file-system "$root"; else say "kept $root"; fi
}
trap cleanup EXIT
mkdir -p "$root"
tar -C "$root" -xf "$base"

# The repository as CI sees it (a clean clone of HEAD) with ../shared beside it.
mkdir -p "$root/work"
git clone -q "$repo" "$root/work/main"
[ -d "$shared" ] && cp -a "$shared" "$root/work/shared"

# What the host needs to reach the registries: name resolution, its CA bundle (this host's
# egress proxy has its own CA), and pip's settings other than this machine's local wheels.
cp /etc/resolv.conf "$root/etc/resolv.conf"
host_ca=/etc/ssl/certs/ca-certificates.crt
env_vars=("HOME=/root" "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
if [ -f "$host_ca" ]; then
  cp "$host_ca" "$root/root/host-ca.crt"
  env_vars+=("PIP_CERT=/root/host-ca.crt" "SSL_CERT_FILE=/root/host-ca.crt"
             "REQUESTS_CA_BUNDLE=/root/host-ca.crt")
fi
for name in PIP_DEFAULT_TIMEOUT PIP_DISABLE_PIP_VERSION_CHECK; do
  [ -n "${!name:-}" ] && env_vars+=("$name=${!name}")
done

# The run itself, as a script inside the chroot: each command timed, stop at the first failure.
{
  echo 'set -u; cd /work/main'
  for c in "${commands[@]}"; do
    printf 'echo "+ %s"; t0=$(date +%%s)\n' "$c"
    printf '%s || { s=$?; echo "= %s: FAILED (exit $s) after $(( $(date +%%s) - t0 )) s"; exit $s; }\n' "$c" "$c"
    printf 'echo "= %s: $(( $(date +%%s) - t0 )) s"\n' "$c"
  done
} > "$root/root/fresh-run.sh"

say "running in $root: ${commands[*]}"
set +e
unshare -m bash -c '
  set -e
  root=$1; shift
  mount --make-rprivate /
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount --make-rslave "$root/dev"
  mount -t sysfs sys "$root/sys"
  exec chroot "$root" env -i "$@" bash /root/fresh-run.sh
' fresh "$root" "${env_vars[@]}"
status=$?
say "done (exit $status)"
exit $status
