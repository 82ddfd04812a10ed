#!/usr/bin/env bash
# Generates the test videos into fixtures/ (git-ignored) with the ffmpeg CLI: short clips of
# FFmpeg's test pattern in every container and codec the decoder must read, a clip made from the
# real photos that ship with scikit-image and matplotlib, and damaged inputs. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/fixtures"
stamp="$out/.complete-v6"
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
# AVI and FLV at 320x240 with the audio such files usually carry: MPEG-4 Part 2 with MP3 and
# MJPEG in AVI, H.264 with AAC in FLV.
small=(-f lavfi -i "testsrc2=size=320x240:rate=25:duration=4")
tone=(-f lavfi -i "sine=frequency=440:duration=4")
"${ff[@]}" "${small[@]}" "${tone[@]}" -c:v mpeg4 -q:v 5 -g 25 -c:a libmp3lame -b:a 64k mpeg4.avi
"${ff[@]}" "${small[@]}" -c:v mjpeg -q:v 5 -pix_fmt yuvj420p mjpeg.avi
"${ff[@]}" "${small[@]}" "${tone[@]}" "${x264[@]}" -c:a aac -b:a 64k clip.flv
# Codecs outside the allow-list: PNG pictures and raw RGB in Matroska.
"${ff[@]}" "${small[@]}" -t 1 -c:v png png.mkv
"${ff[@]}" -f lavfi -i "testsrc2=size=64x64:rate=5:duration=1" -c:v rawvideo -pix_fmt rgb24 -allow_raw_vfw 1 -f matroska rawvideo.mkv
# Clips with the audio phones and browsers record: AAC in MP4, Opus in WebM.
"${ff[@]}" -i master.mkv "${tone[@]}" -c:v copy -c:a aac -b:a 96k -movflags +faststart with_aac.mp4
"${ff[@]}" "${src[@]}" "${tone[@]}" -c:v libvpx-vp9 -deadline realtime -cpu-used 8 -g 25 -c:a libopus -b:a 64k with_opus.webm
# Raw H.264 that switches from 64x64 to 1024x1024 with a new SPS (two Annex-B streams, one
# after the other), and raw H.264 whose first picture is 8192x8192 (making it takes ffmpeg
# about 800 MB for a moment).
for s in 64 1024; do
  "${ff[@]}" -f lavfi -i "testsrc2=size=${s}x${s}:rate=25:duration=1" "${x264[@]}" -f h264 "switch_$s.h264"
done
cat switch_64.h264 switch_1024.h264 > switch.h264
# The same switch in HEVC (raw), VP9 and AV1 (WebM, joined by the concat demuxer).
for s in 64 1024; do
  size=(-f lavfi -i "testsrc2=size=${s}x${s}:rate=25:duration=1")
  "${ff[@]}" "${size[@]}" -c:v libx265 -preset ultrafast -x265-params log-level=none -g 25 -f hevc "switch_$s.hevc"
  "${ff[@]}" "${size[@]}" -c:v libvpx-vp9 -deadline realtime -cpu-used 8 -g 25 "switch_vp9_$s.webm"
  "${ff[@]}" "${size[@]}" -c:v libsvtav1 -preset 12 -g 25 "switch_av1_$s.webm" 2>/dev/null
done
cat switch_64.hevc switch_1024.hevc > switch.hevc
for codec in vp9 av1; do
  printf "file 'switch_%s_64.webm'\nfile 'switch_%s_1024.webm'\n" "$codec" "$codec" > "switch_$codec.txt"
  "${ff[@]}" -f concat -safe 0 -i "switch_$codec.txt" -c copy "switch_$codec.webm"
done
rm switch_64.h264 switch_1024.h264 switch_64.hevc switch_1024.hevc switch_*_64.webm switch_*_1024.webm switch_*.txt
"${ff[@]}" -f lavfi -i "color=black:size=8192x8192:rate=25:duration=0.08" -c:v libx264 -preset ultrafast -pix_fmt yuv420p -f h264 huge_first.h264
"${ff[@]}" -i huge_first.h264 -c copy huge_first.flv
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
  # Tracking clip: the cat photo (240x160) on grey, 640x480 at 10 fps for 5 s. It walks right
  # from x=20 to x=380 in 2 s, back to x=20 in 2 s, and stays. Its bottom centre (x+120, 360)
  # crosses x=320 at 1.0 s and 3.0 s, and is right of x=400 from 1.45 s to 2.55 s.
  for photo in "${photos[@]}"; do
    case "$photo" in */chelsea.png) cat_photo="$photo" ;; esac
  done
  "${ff[@]}" -f lavfi -i "color=gray:size=640x480:rate=10:duration=5" -loop 1 -i "$cat_photo" \
    -filter_complex "[1:v]scale=240:160,setsar=1[cat];[0:v][cat]overlay=x='if(lt(t,2),20+180*t,if(lt(t,4),380-180*(t-2),20))':y=200:shortest=1,format=yuv420p" \
    "${x264[@]}" -movflags +faststart walking_cat.mp4
}
rm master.mkv
touch "$stamp"
