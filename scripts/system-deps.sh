#!/usr/bin/env bash
# Debian packages the test suite and `make image-test` use, installed when missing:
#   chromium + chromium-driver  the playground's browser test (/usr/bin/chromium, /usr/bin/chromedriver)
#   prometheus                  promtool, which checks docker/prometheus config and alert rules
#   buildah + debootstrap       build and run the container image without a Docker daemon
# Under CI=true a package that cannot be installed is an error; elsewhere a warning (the tests that
# need it then skip and say why).
set -euo pipefail

need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v promtool >/dev/null || need+=(prometheus)
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ ${#need[@]} -eq 0 ] && exit 0

echo "system-deps: installing ${need[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    if $sudo apt-get update -q >/dev/null && \
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; then
        exit 0
    fi
fi
msg="system-deps: could not install ${need[*]} (needs apt-get as root); install them by hand"
if [ "${CI:-}" = "true" ]; then
    echo "$msg" >&2
    exit 1
fi
echo "$msg; the tests that need them will skip" >&2
