// Loudness of the avatar's audio as the browser plays it: RMS of every 128-sample render block,
// tagged with its audio-clock frame, posted in batches. Used for the live A/V offset measurement.
class EdgeTalkMeter extends AudioWorkletProcessor {
  constructor() {
    super();
    this.batch = [];
  }

  process(inputs) {
    const input = inputs[0];
    let sum = 0;
    let n = 0;
    if (input && input.length) {
      for (const ch of input) {
        for (let i = 0; i < ch.length; i++) sum += ch[i] * ch[i];
        n += ch.length;
      }
    }
    this.batch.push(currentFrame, n ? Math.sqrt(sum / n) : 0);
    if (this.batch.length >= 16) {
      this.port.postMessage(this.batch);
      this.batch = [];
    }
    return true;
  }
}

registerProcessor("edgetalk-meter", EdgeTalkMeter);
