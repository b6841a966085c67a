#!/usr/bin/env bash
# Write protos/released/v1.binpb, the buf image of the protos as of a release (a git tag or commit), from git alone:
#   bash protos/released/build.sh 0ff93ef      # the image committed today (the API before any tag existed)
#   bash protos/released/build.sh v1.1.0       # at the next release
set -euo pipefail
ref=${1:?usage: build.sh GIT-REF}
root=$(git rev-parse --show-toplevel)
buf="$root/node_modules/.bin/buf"
[ -x "$buf" ] || { echo "buf is missing: run make buf" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$root" ls-tree -r --name-only "$ref" -- protos/shopvision | grep '\.proto$' | while read -r path; do
  mkdir -p "$work/$(dirname "${path#protos/}")"
  git -C "$root" show "$ref:$path" > "$work/${path#protos/}"
done
(cd "$work" && "$buf" build -o "$root/protos/released/v1.binpb")
echo "protos/released/v1.binpb: the protos of $ref ($(git -C "$root" rev-parse --short "$ref^{commit}"))"
