#!/usr/bin/env bash
# Materializes the reference PyTorch code bases that experiments/speed_vs_reference.py runs,
# each at a pinned commit, into experiments/reference_code/<name>/ (ignored by git; never a
# part of jaxkd, never imported by it).
#
#   experiments/fetch_reference.sh                 # from GitHub
#   REFERENCE_MIRRORS=/path/to/mirrors experiments/fetch_reference.sh
#       # offline: from local git directories <mirrors>/<owner>+<name>/repo (bare) or
#       # <mirrors>/<owner>+<name> (a clone), e.g. the ones a previous fetch left
#
# Each folder gets a file COMMIT holding the commit it was taken from; a folder that already
# holds the pinned commit is left as it is. Exit status 1 if any repository could not be read.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${REFERENCE_CODE:-$HERE/reference_code}"
MIRRORS="${REFERENCE_MIRRORS:-}"

# name  owner/repository  commit
PINNED=(
  "SSKD         xuguodong03/SSKD           661b972c124a83c32dcd0e203390ba637075fe92"
  "HSAKD        winycg/HSAKD               28c8dc2f5a1bedc5caf263884b4fe46e3f55c23b"
  "RepDistiller HobbitLong/RepDistiller    b84f547c5db6a35318d4671d7d5c4de74c822403"
  "mdistiller   megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259"
  "EGA          yccm/EGA                   0963f8e16cb442356f99541ad352418eff200941"
  "CLIP         openai/CLIP                d05afc436d78f1c48dc0dbf8e5980a9d471f35f6"
)

git_dir_of() {  # a local git directory holding owner/repository, or nothing
  local slug="${1/\//+}"
  [[ -n "$MIRRORS" ]] || return 0
  for candidate in "$MIRRORS/$slug/repo" "$MIRRORS/$slug/.git" "$MIRRORS/$slug"; do
    if git --git-dir="$candidate" rev-parse --git-dir >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
}

materialize() {  # name owner/repository commit
  local name="$1" repo="$2" commit="$3" target="$DEST/$1"
  if [[ -f "$target/COMMIT" && "$(cat "$target/COMMIT")" == "$commit" ]]; then
    echo "$name: $commit (already there)"
    return 0
  fi
  local git_dir tmp
  git_dir="$(git_dir_of "$repo")"
  tmp="$(mktemp -d)"
  if [[ -z "$git_dir" ]]; then
    if ! git clone --quiet --bare --filter=blob:none "https://github.com/$repo.git" "$tmp/repo"
    then
      echo "$name: could not clone https://github.com/$repo.git" >&2
      rm -rf "$tmp"
      return 1
    fi
    git_dir="$tmp/repo"
  fi
  if ! git --git-dir="$git_dir" cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "$name: commit $commit is not in $git_dir" >&2
    rm -rf "$tmp"
    return 1
  fi
  mkdir -p "$tmp/tree"
  git --git-dir="$git_dir" archive "$commit" | tar -x -C "$tmp/tree"
  echo "$commit" > "$tmp/tree/COMMIT"
  mkdir -p "$DEST"
  rm -rf "$target"
  mv "$tmp/tree" "$target"
  rm -rf "$tmp"
  echo "$name: $commit -> $target"
}

status=0
for line in "${PINNED[@]}"; do
  # shellcheck disable=SC2086
  materialize $line || status=1
done
exit $status
