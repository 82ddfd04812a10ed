#!/usr/bin/env bash
# Generates the test videos into fixtures/ (git-ignored) with the ffmpeg CLI: short clips of
# FFmpeg's test pattern in every container and codec the decoder must read, a clip made from the
# real photos that ship with scikit-image and matplotlib, and damaged inputs. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/fixtures"
stamp="$out/.complete-v4"
[ -f "$stamp" ] && exit 0
mkdir -p "$out"
cd "$out"
# One maker at a time: concurrent test processes wait for the first one.
exec 9>"$out/.lock"
flock 9
[ -f "$stamp" ] && exit 0
ff=(ffmpeg -hide_banner -loglevel error -y)
src=(-f lavfi -i "testsrc2=size=640x360:rate=25:duration=4")
x264=(-c:v libx264 -preset veryfast -pix_fmt yuv420p -g 25)

"${ff[@]}" "${src[@]}" "${x264[@]}" -f matroska master.mkv
"${ff[@]}" -i master.mkv -c copy -movflags +faststart faststart.mp4
"${ff[@]}" -i master.mkv -c copy moov_end.mp4
"${ff[@]}" -i master.mkv -c copy -movflags +frag_keyframe+empty_moov+default_base_moof fragmented.mp4
"${ff[@]}" -i master.mkv -c copy clip.mkv
"${ff[@]}" -i master.mkv -c copy -f mpegts clip.ts
"${ff[@]}" -i master.mkv -c copy -bsf:v h264_mp4toannexb -f h264 clip.h264
"${ff[@]}" "${src[@]}" -c:v libvpx-vp9 -deadline realtime -cpu-used 8 -g 25 vp9.webm
"${ff[@]}" "${src[@]}" -c:v libvpx -deadline realtime -cpu-used 8 -g 25 vp8.webm
"${ff[@]}" "${src[@]}" -c:v libsvtav1 -preset 12 -g 25 av1.webm 2>/dev/null
"${ff[@]}" "${src[@]}" -c:v libx265 -preset ultrafast -x265-params log-level=none -g 25 -movflags +faststart hevc.mp4
"${ff[@]}" "${src[@]}" -c:v mpeg4 -q:v 5 -g 25 -movflags +faststart mpeg4.mp4
"${ff[@]}" -i master.mkv -c copy -metadata:s:v:0 rotate=90 -movflags +faststart rotated.mp4
# A white 100x50 rectangle at (40, 30) on black, plain and tagged with a 90-degree rotation.
"${ff[@]}" -f lavfi -i "color=black:size=640x360:rate=25:duration=1,drawbox=x=40:y=30:w=100:h=50:color=white:t=fill" \
  "${x264[@]}" -movflags +faststart rect.mp4
"${ff[@]}" -i rect.mp4 -c copy -metadata:s:v:0 rotate=90 -movflags +faststart rect_rotated.mp4
# A longer, denser MPEG-TS (about 8 MB) for live-input tests that must outgrow the buffer's
# discard margin.
"${ff[@]}" -f lavfi -i "testsrc2=size=640x360:rate=25:duration=8,noise=alls=20:allf=t+u" "${x264[@]}" -b:v 8M -minrate 8M -maxrate 8M -bufsize 2M -f mpegts live.ts
# Damaged and foreign inputs.
head -c "$(( $(stat -c %s faststart.mp4) * 6 / 10 ))" faststart.mp4 > truncated.mp4
python3 - <<'PY'
# 16 KiB of garbage in the middle of the MPEG-TS clip: packets to skip, not a reason to stop.
data = bytearray(open("clip.ts", "rb").read())
middle = len(data) // 2
data[middle:middle + 16384] = bytes((i * 151 + 7) % 256 for i in range(16384))
open("corrupt.ts", "wb").write(data)
PY
"${ff[@]}" -f lavfi -i "testsrc2=size=320x240" -frames:v 1 image.jpg
"${ff[@]}" -f lavfi -i "anullsrc=r=44100:cl=mono" -t 1 -c:a aac audio.m4a
printf '#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n' > playlist.m3u8
printf "ffconcat version 1.0\nfile '/etc/passwd'\n" > concat.txt
# A raw-video Matroska whose header declares 65535x65535 (the largest a 2-byte EBML field holds):
# it must be refused before any frame is allocated.
"${ff[@]}" -f lavfi -i "testsrc2=size=640x360:rate=5:duration=1" -c:v rawvideo -pix_fmt rgb24 -allow_raw_vfw 1 -f matroska raw.mkv
python3 - <<'PY'
data = bytearray(open("raw.mkv", "rb").read())
for element, value in ((b"\xb0\x82", 640), (b"\xba\x82", 360)):
    at = data.find(element + value.to_bytes(2, "big"))
    assert at >= 0, "dimension element not found"
    data[at + 2:at + 4] = (65535).to_bytes(2, "big")
open("huge.mkv", "wb").write(data)
PY
rm raw.mkv

# Detection clip: the real photos, one second each at 5 fps, 1280x720, faststart MP4.
[ -x "$root/.venv/bin/python" ] || { echo "make-fixtures: no .venv; run scripts/setup.sh first" >&2; exit 1; }
{
  mapfile -t photos < <("$root/.venv/bin/python" "$root/scripts/photos.py")
  inputs=(); chain=""; labels=""
  for i in "${!photos[@]}"; do
    inputs+=(-loop 1 -t 1 -framerate 5 -i "${photos[$i]}")
    chain+="[$i:v]scale=1280:720:force_original_aspect_ratio=decrease,pad=1280:720:(ow-iw)/2:(oh-ih)/2,setsar=1,format=yuv420p[v$i];"
    labels+="[v$i]"
  done
  chain+="${labels}concat=n=${#photos[@]}:v=1:a=0[out]"
  "${ff[@]}" "${inputs[@]}" -filter_complex "$chain" -map "[out]" "${x264[@]}" -r 5 -movflags +faststart photos.mp4
}
rm master.mkv
touch "$stamp"
