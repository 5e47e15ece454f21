# Sourced by the launch scripts (bash): the --dry-run switch, run(), require_env.
#
#   source "$REPO/launch/lib.sh"
#   dry_run_switch "$@" && shift   # DRY_RUN=1 when the first argument is --dry-run
#   require_env "e.g. ZONE=us-east5-a" ZONE PROJECT
#   run gcloud ...                 # prints "+ cmd args" (shell-quoted); runs it unless DRY_RUN=1

DRY_RUN=0

dry_run_switch() {
  if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    return 0
  fi
  return 1
}

require_env() {
  local hint=$1 missing=() v
  shift
  for v in "$@"; do
    [[ -n "${!v:-}" ]] || missing+=("$v")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "$0: set ${missing[*]}${hint:+ ($hint)}" >&2
    exit 2
  fi
}

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}
