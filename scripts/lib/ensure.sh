# Shared by scripts/test and scripts/demo: install and start what convoy needs on a fresh
# Debian machine. Sourced, not run.

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_tools() {
  local missing=()
  command -v git >/dev/null || missing+=(git)
  command -v cc >/dev/null || missing+=(gcc libc6-dev)
  command -v curl >/dev/null || missing+=(curl ca-certificates)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  [ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  # The fetcher's SSH test runs a private sshd.
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  if ! command -v cargo >/dev/null; then
    log "cargo is missing: install Rust (https://rustup.rs) and run this again"
    return 1
  fi
}

# RabbitMQ on 127.0.0.1:5672: use the running one, else start (and if needed install) it.
ensure_rabbitmq() {
  if [ -n "${CONVOY_TEST_AMQP_URL:-}" ]; then
    log "using the broker at CONVOY_TEST_AMQP_URL"
    return 0
  fi
  if port_open 5672; then
    log "RabbitMQ is answering on 127.0.0.1:5672"
    return 0
  fi
  if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    log "installing rabbitmq-server from Debian's packages"
    apt_install rabbitmq-server
  fi
  if port_open 5672; then return 0; fi
  log "starting RabbitMQ"
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    as_root systemctl start rabbitmq-server
  else
    # Without systemd (whose unit sets LimitNOFILE=65536) the node inherits this shell's
    # file limit, often 1024: a few hundred connections then exhaust it and the broker stops
    # answering new ones. Give it the hard limit.
    # Debian's rabbitmq-server switches user through su, whose PAM session puts the file
    # limit back to 1024; start the node as its user without PAM so it keeps the hard limit.
    as_root sh -c 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; cd /var/lib/rabbitmq &&
      if command -v setpriv >/dev/null && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
        exec setpriv --reuid rabbitmq --regid rabbitmq --init-groups env HOME=/var/lib/rabbitmq \
          /usr/lib/rabbitmq/bin/rabbitmq-server -detached
      else exec rabbitmq-server -detached; fi'
  fi
  for _ in $(seq 1 120); do
    if port_open 5672; then log "RabbitMQ is up"; return 0; fi
    sleep 1
  done
  log "RabbitMQ did not start within 120 s; see /var/log/rabbitmq/"
  return 1
}

# Queues and exchanges of earlier test runs that were killed before they could clean up
# (named t-<pid>-… by the testkit; their process is gone): each quorum queue holds broker file
# handles, and a few hundred of them starve a broker started with a 1024 file limit.
sweep_test_leftovers() {
  if [ -n "${CONVOY_TEST_AMQP_URL:-}" ] || ! command -v rabbitmqctl >/dev/null; then return 0; fi
  local queues exchanges
  queues=$(as_root timeout 60 rabbitmqctl list_queues -q name 2>/dev/null) || return 0
  exchanges=$(as_root timeout 60 rabbitmqctl list_exchanges -q name 2>/dev/null) || return 0
  cargo build -q -p convoy-testkit --bin convoy-test-sweep
  printf '%s\n' "$queues" | "${CARGO_TARGET_DIR:-target}/debug/convoy-test-sweep" || true
  printf '%s\n' "$exchanges" | "${CARGO_TARGET_DIR:-target}/debug/convoy-test-sweep" --exchanges || true
}

# cargo-deb (from crates.io) for scripts/package. Built once into ~/.cargo/bin.
ensure_cargo_deb() {
  if cargo deb --version >/dev/null 2>&1; then return 0; fi
  log "installing cargo-deb from crates.io"
  cargo install --locked cargo-deb
}

# Debian's lintian and the tools the packages' maintainer scripts and checks use.
ensure_lintian() {
  local missing=()
  command -v lintian >/dev/null || missing+=(lintian)
  command -v dpkg-deb >/dev/null || missing+=(dpkg)
  command -v adduser >/dev/null || missing+=(adduser)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
}

# The dashboard's browser test: Debian's Chromium and Node.js, and playwright-core from npm
# (crates/conductor/tests/browser, pinned by its package-lock.json).
ensure_browser() {
  local missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  if [ ! -d crates/conductor/tests/browser/node_modules/playwright-core ]; then
    log "installing playwright-core (npm ci)"
    (cd crates/conductor/tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  fi
}
