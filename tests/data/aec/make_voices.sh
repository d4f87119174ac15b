#!/usr/bin/env bash
# Regenerates the espeak-ng voices of the echo-cancellation tests (tests/test_aec.py):
# near-end "users" (interruptions) and far-end "answers" in voices other than the LibriSpeech
# clip's. espeak-ng's output is not covered by its GPL. Needs espeak-ng and the repo's venv.
set -euo pipefail
cd "$(dirname "$0")"
say() {  # say NAME VOICE SPEED TEXT
  espeak-ng -v "$2" -s "$3" -w "/tmp/$1.wav" "$4"
  python - "/tmp/$1.wav" "$1.flac" <<'PY'
import sys
import soundfile
from spiritlm_edge.runtime.audio import load_audio
soundfile.write(sys.argv[2], load_audio(sys.argv[1]), 16000, subtype="PCM_16")
PY
  rm "/tmp/$1.wav"
}
say near-stop en-us+f3 165 "Wait, stop. That is not what I asked."
say near-question en-gb+m4 150 "Sorry, can I ask you something else?"
say near-no en-us+m2 175 "No no, hold on a second please."
say near-actually en-gb-scotland+f2 160 "Actually, tell me about the weather tomorrow."
say far-answer1 en-gb+m3 150 "The museum opens at nine in the morning and closes at six in the evening. Tickets can be bought at the entrance or online, and children under twelve go in for free."
say far-answer2 en-us+f4 160 "I found three restaurants near you. The closest one serves Italian food and has good reviews. The second is a small sushi bar, and the third is open late tonight."
