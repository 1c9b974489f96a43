#!/bin/sh
# copy-runtime-libs.sh IMAGE LIST DEST: copies the shared libraries that LIST
# (env/runtime-libs.txt) names for IMAGE (worker or operator) into DEST under the same paths,
# symbolic links followed. Used by scripts/images.sh (the images `make images` builds) and by
# the build stage of Dockerfile.worker/Dockerfile.operator, so that both kinds of image carry
# exactly the listed files. POSIX sh and coreutils only: it runs inside the Dockerfiles'
# Debian build stage too. A listed file that is missing here is an error.
set -eu
if [ $# -ne 3 ]; then
  echo "usage: $0 IMAGE LIST DEST" >&2
  exit 2
fi
image=$1 list=$2 dest=$3
n=0
while read -r img path rest || [ -n "$img" ]; do
  case $img in '' | '#'*) continue ;; esac
  if [ -z "$path" ] || [ -n "$rest" ]; then
    echo "$list: expected 'IMAGE PATH', got: $img $path $rest" >&2
    exit 1
  fi
  [ "$img" = "$image" ] || continue
  case $path in /*) ;; *) echo "$list: $path is not an absolute path" >&2; exit 1 ;; esac
  if [ ! -f "$path" ]; then
    echo "$list: $path (a library of the $image image) is not on this system" >&2
    exit 1
  fi
  mkdir -p "$dest$(dirname "$path")"
  cp -L "$path" "$dest$path"
  n=$((n + 1))
done <"$list"
echo "$image: $n shared libraries from $list" >&2
