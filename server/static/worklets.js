// AudioWorklet processors of the kiosk page (run on the browser's audio thread).
//
// "capture": microphone frames -> 100 ms Float32 blocks (posted to the page) + input level.
// "player":  Float32 chunks from the page -> gapless playback from a queue; "clear" drops
//            what is queued (barge-in); reports samples played so the page can say what was heard.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.blockSize = (options.processorOptions && options.processorOptions.blockSize) || 2400;
    this.block = new Float32Array(this.blockSize);
    this.filled = 0;
    this.sumSquares = 0;
    this.count = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const x = channel[i];
      this.block[this.filled++] = x;
      this.sumSquares += x * x;
      this.count++;
      if (this.filled === this.blockSize) {
        const rms = Math.sqrt(this.sumSquares / this.count);
        this.port.postMessage({ samples: this.block, rms }, [this.block.buffer]);
        this.block = new Float32Array(this.blockSize);
        this.filled = 0;
        this.sumSquares = 0;
        this.count = 0;
      }
    }
    return true;
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0; // read position in queue[0]
    this.played = 0; // samples played since the last "reset"
    this.wasPlaying = false;
    this.quanta = 0;
    this.port.onmessage = (event) => {
      const message = event.data;
      if (message.type === "chunk") {
        this.queue.push(message.samples);
      } else if (message.type === "clear") {
        this.queue = [];
        this.offset = 0;
      } else if (message.type === "reset") {
        this.played = 0;
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    while (written < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - written, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      if (this.offset === head.length) {
        this.queue.shift();
        this.offset = 0;
      }
    }
    out.fill(0, written);
    this.played += written;
    const playing = this.queue.length > 0;
    // Report every ~50 ms while audio flows, and at once when playback starts or stops.
    if (playing !== this.wasPlaying || (written > 0 && ++this.quanta % 10 === 0)) {
      this.port.postMessage({ played: this.played, playing });
    }
    this.wasPlaying = playing;
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
registerProcessor("player", PlayerProcessor);
