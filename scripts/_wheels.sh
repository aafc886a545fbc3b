# Sourced by install_lava.sh and install_lava_dl.sh (needs $PY and $CACHE): download a wheel once, check its sha256.
# fetch_checked NAME VERSION WHEEL_FILE SHA256 -> $CACHE/WHEEL_FILE, verified (a mismatch is deleted and refused).
fetch_checked() {
    local name=$1 version=$2 wheel=$3 sha=$4
    mkdir -p "$CACHE"
    if [ ! -f "$CACHE/$wheel" ]; then
        "$PY" -m pip download -q --no-deps --ignore-requires-python "$name==$version" -d "$CACHE"
    fi
    echo "$sha  $CACHE/$wheel" | sha256sum -c --quiet - || {
        echo "$(basename "$0"): checksum mismatch for $CACHE/$wheel (expected sha256 $sha); refusing to install" >&2
        rm -f "$CACHE/$wheel"
        exit 1
    }
}
