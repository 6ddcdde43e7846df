// Source of the example workflows: node lists and links by name. build_workflows.mjs turns each spec into
// ComfyUI workflow JSON inside a real front end (so widget order, slots and links are what ComfyUI writes).
export const CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors";

const ckpt = (x, y) => ({ type: "CheckpointLoaderSimple", pos: [x, y], widgets: { ckpt_name: CHECKPOINT } });
const text = (x, y, value, title) => ({ type: "CLIPTextEncode", pos: [x, y], size: [340, 160], title,
  widgets: { text: value } });
const latent = (x, y, batch) => ({ type: "EmptyLatentImage", pos: [x, y],
  widgets: { width: 512, height: 512, batch_size: batch } });
const decode = (x, y) => ({ type: "VAEDecode", pos: [x, y] });
const save = (x, y, prefix) => ({ type: "SaveImage", pos: [x, y], size: [340, 380], widgets: { filename_prefix: prefix } });
const note = (x, y, value) => ({ type: "Note", pos: [x, y], size: [440, 200], widgets: { text: value } });
const spellSampler = (x, y, widgets) => ({ type: "ShieldedSpellSampler", pos: [x, y],
  widgets: { seed: 42, steps: 25, cfg: 7.0, sampler_name: "euler", scheduler: "normal", ...widgets } });

const promptLinks = (sampler) => [
  ["ckpt", "CLIP", "positive", "clip"], ["ckpt", "CLIP", "negative", "clip"],
  ["positive", "CONDITIONING", sampler, "positive"], ["negative", "CONDITIONING", sampler, "negative"],
  ["latent", "LATENT", sampler, "latent_image"],
];
const outputLinks = (sampler) => [
  [sampler, "LATENT", "decode", "samples"], ["ckpt", "VAE", "decode", "vae"], ["decode", "IMAGE", "save", "images"],
];

/** Particle Guidance -> KSampler beside a same-seed KSampler without it (both decoded and saved). */
const particleBatchSpec = (file, prefix, samplerName, particleWidgets, noteNode) => {
  const ksampler = (y, title) => ({ type: "KSampler", pos: [1180, y], ...(title ? { title } : {}),
    widgets: { seed: 42, control_after_generate: "fixed", steps: 25, cfg: 7.0, sampler_name: samplerName,
      scheduler: "normal" } });
  return {
    file,
    nodes: {
      ckpt: ckpt(20, 80),
      positive: text(380, 40, "a photo of a dog in a park, detailed", "Positive"),
      negative: text(380, 260, "blurry, low quality", "Negative"),
      latent: latent(380, 480, 4),
      particle: { type: "ParticleGuidance", pos: [780, 40], widgets: particleWidgets },
      sampler: ksampler(40),
      plain: ksampler(400, "KSampler (same seed, no guidance)"),
      decode: decode(1540, 40),
      decodePlain: decode(1540, 400),
      save: save(1760, 40, prefix),
      savePlain: save(1760, 460, `${prefix}_baseline`),
      note: noteNode,
    },
    links: [...promptLinks("sampler"), ["ckpt", "MODEL", "particle", "model"], ["particle", "MODEL", "sampler", "model"],
      ["ckpt", "MODEL", "plain", "model"], ["positive", "CONDITIONING", "plain", "positive"],
      ["negative", "CONDITIONING", "plain", "negative"], ["latent", "LATENT", "plain", "latent_image"],
      ...outputLinks("sampler"), ["plain", "LATENT", "decodePlain", "samples"], ["ckpt", "VAE", "decodePlain", "vae"],
      ["decodePlain", "IMAGE", "savePlain", "images"]],
  };
};

export const SPECS = [
  {
    file: "spell_diverse_batch_with_history",
    nodes: {
      ckpt: ckpt(20, 80),
      positive: text(380, 40, "a photo of a dog in a park, detailed", "Positive"),
      negative: text(380, 260, "blurry, low quality", "Negative"),
      latent: latent(380, 480, 4),
      sampler: spellSampler(780, 40, { radius: 0.15, intra_batch: true, history: true, history_name: "dogs" }),
      decode: decode(1180, 40),
      save: save(1400, 40, "spell_diverse"),
      report: { type: "ShieldedSpellReport", pos: [1180, 480], size: [440, 720] },
      note: note(20, 680, "Diverse batch with history (SPELL, Kirchhof et al. 2025).\n\nintra_batch repels each " +
        "image of the batch from the others; history also repels from the outputs of earlier runs named 'dogs', " +
        "so queueing again gives new images. radius is per latent element; start from SPELL Radius Calibration " +
        "(median of an unguided batch). SPELL Report shows per step how many samples were corrected."),
    },
    links: [...promptLinks("sampler"), ["ckpt", "MODEL", "sampler", "model"], ...outputLinks("sampler"),
      ["sampler", "report", "report", "report"], ["decode", "IMAGE", "report", "images"]],
  },
  {
    file: "spell_radius_calibration",
    nodes: {
      ckpt: ckpt(20, 80),
      positive: text(380, 40, "a photo of a dog in a park, detailed", "Positive"),
      negative: text(380, 260, "blurry, low quality", "Negative"),
      latent: latent(380, 480, 8),
      sampler: { type: "KSampler", pos: [780, 40],
        widgets: { seed: 42, steps: 25, cfg: 7.0, sampler_name: "euler", scheduler: "normal" } },
      calibration: { type: "ShieldedSpellRadiusCalibration", pos: [1160, 40], size: [380, 200],
        widgets: { fraction: 0.5 } },
      note: note(20, 680, "Radius calibration, as in the SPELL paper: generate one batch WITHOUT SPELL, measure " +
        "the median pairwise distance of its latents in the model's space (connect the MODEL), and start from " +
        "a fraction of it. The result also appears as an orange marker on every SPELL node's radius scale."),
    },
    links: [...promptLinks("sampler"), ["ckpt", "MODEL", "sampler", "model"],
      ["sampler", "LATENT", "calibration", "latents"], ["ckpt", "MODEL", "calibration", "model"]],
  },
  {
    file: "dng_dynamic_negative_guidance",
    nodes: {
      ckpt: ckpt(20, 80),
      positive: text(380, 20, "a medieval feast in a great hall", "Positive"),
      negative: text(380, 230, "", "Negative (CFG)"),
      concept: text(380, 440, "chalices, candles", "Concept to avoid"),
      latent: latent(380, 660, 2),
      dng: { type: "ShieldedDynamicNegativeGuidance", pos: [780, 20],
        widgets: { scale: 12.0, prior: 0.01, temperature: 0.2, offset: 0.002 } },
      sampler: { type: "KSampler", pos: [1180, 20],
        widgets: { seed: 7, steps: 30, cfg: 7.0, sampler_name: "euler_ancestral", scheduler: "normal" } },
      decode: decode(1540, 20),
      save: save(1760, 20, "dng"),
      report: { type: "ShieldedDngReport", pos: [1540, 480], size: [520, 480] },
      note: note(20, 860, "Dynamic negative guidance (Koulischer et al. 2025): the concept prompt is pushed away " +
        "with a scale that follows the posterior that the image shows it, so an unrelated concept leaves the " +
        "image alone. DNG Report draws the posterior and scale per sample; its 'after' input makes it run " +
        "after the sampler."),
    },
    links: [
      ["ckpt", "CLIP", "positive", "clip"], ["ckpt", "CLIP", "negative", "clip"], ["ckpt", "CLIP", "concept", "clip"],
      ["ckpt", "MODEL", "dng", "model"], ["concept", "CONDITIONING", "dng", "concept"],
      ["dng", "MODEL", "sampler", "model"], ["positive", "CONDITIONING", "sampler", "positive"],
      ["negative", "CONDITIONING", "sampler", "negative"], ["latent", "LATENT", "sampler", "latent_image"],
      ...outputLinks("sampler"), ["dng", "report", "report", "dng_report"], ["sampler", "LATENT", "report", "after"],
    ],
  },
  particleBatchSpec("particle_guidance_batch", "particle", "euler", { mode: "particle guidance", strength: 0.5,
    space: "pooled NxN", pool_size: 8, start_coupling: "spread 2x2" },
    note(20, 680, "Particle guidance (Corso et al. 2024) pushes the images of one batch apart (most " +
      "spread, but each image's distribution shifts a little). For spread that keeps every image's " +
      "distribution exactly, use mode EDDY (see eddy_diverse_batch). start_coupling 'spread 2x2' spreads the " +
      "batch's starting noises while every image keeps an exactly standard-normal noise (strength 0 = " +
      "coupling alone). The lower sampler uses the same seed without guidance, for comparison. Batch size 1 " +
      "has no effect.")),
  particleBatchSpec("eddy_diverse_batch", "eddy", "euler_ancestral", { mode: "EDDY", strength: 1.0,
    space: "pooled NxN", pool_size: 8, start_coupling: "auto" },
    note(20, 680, "EDDY: a more varied batch; every image keeps exactly the distribution it has without the " +
      "node. start_coupling 'auto' spreads the coarse 2x2 layout of the batch's starting noise and of every " +
      "fresh noise draw of ancestral/SDE samplers (euler_ancestral, dpmpp_2m_sde, ...; ODE samplers such as " +
      "euler get only the start). strength 0..1 blends it in (1 = most spread). 'independent' instead " +
      "correlates the whole noise by a look-alike kernel (space, pool_size). The lower sampler uses the same " +
      "seed without the node, for comparison. Batch size 1 has no effect.")),
  {
    file: "spell_protect_folder",
    nodes: {
      ckpt: ckpt(20, 80),
      loader: { type: "ShieldSetLoader", pos: [20, 260], size: [340, 230],
        widgets: { folder: "shields", width: 512, height: 512, resize: "center-crop" } },
      positive: text(380, 40, "a watercolor painting of a lighthouse at dusk", "Positive"),
      negative: text(380, 260, "blurry, low quality", "Negative"),
      latent: latent(380, 480, 4),
      sampler: spellSampler(780, 40, { radius: 0.3, intra_batch: false, history: false }),
      decode: decode(1180, 40),
      save: save(1400, 40, "spell_protected"),
      report: { type: "ShieldedSpellReport", pos: [1180, 480], size: [440, 720] },
      note: note(20, 680, "Protect a folder (SPELL, Kirchhof et al. 2025): put the images to stay away from in " +
        "ComfyUI/input/shields/ (or models/shields/). Shield Set Loader encodes them once with the VAE and caches " +
        "the latents; SPELL Sampler then keeps every output at least 'radius' away from each of them. SPELL " +
        "Report shows each output beside its nearest protected image, with the distance and whether it was " +
        "repelled. Use the width/height you generate at."),
    },
    links: [...promptLinks("sampler"), ["ckpt", "MODEL", "sampler", "model"], ["ckpt", "VAE", "loader", "vae"],
      ["loader", "shield_set", "sampler", "shield_set"], ...outputLinks("sampler"),
      ["sampler", "report", "report", "report"], ["decode", "IMAGE", "report", "images"],
      ["loader", "shield_set", "report", "shield_set"]],
  },
  {
    file: "all_combined",
    nodes: {
      ckpt: ckpt(20, 80),
      loader: { type: "ShieldSetLoader", pos: [20, 260], size: [340, 230],
        widgets: { folder: "shields", width: 512, height: 512, resize: "center-crop" } },
      positive: text(380, 20, "a medieval feast in a great hall", "Positive"),
      negative: text(380, 230, "blurry, low quality", "Negative (CFG)"),
      concept: text(380, 440, "chalices, candles", "Concept to avoid"),
      latent: latent(380, 660, 4),
      dng: { type: "ShieldedDynamicNegativeGuidance", pos: [780, 20],
        widgets: { scale: 12.0, prior: 0.01, temperature: 0.2, offset: 0.002 } },
      particle: { type: "ParticleGuidance", pos: [780, 400],
        widgets: { mode: "particle guidance", strength: 0.3, space: "pooled NxN", pool_size: 8,
          start_coupling: "independent" } },
      sampler: spellSampler(1180, 20, { radius: 0.2, intra_batch: true, history: true, history_name: "feast" }),
      decode: decode(1580, 20),
      save: save(1800, 20, "combined"),
      report: { type: "ShieldedSpellReport", pos: [1580, 460], size: [440, 720] },
      dngReport: { type: "ShieldedDngReport", pos: [2060, 460], size: [520, 480] },
      note: note(20, 860, "Everything at once: the model is patched by Dynamic Negative Guidance (keep the concept " +
        "out) and Particle Guidance (spread the batch), then SPELL Sampler keeps the outputs away from the " +
        "protected folder, from each other and from earlier runs ('feast' history). The post-CFG patches run " +
        "in the order they were applied; SPELL runs last, so its guarantee holds for the final prediction."),
    },
    links: [
      ["ckpt", "CLIP", "positive", "clip"], ["ckpt", "CLIP", "negative", "clip"], ["ckpt", "CLIP", "concept", "clip"],
      ["ckpt", "VAE", "loader", "vae"], ["ckpt", "MODEL", "dng", "model"], ["concept", "CONDITIONING", "dng", "concept"],
      ["dng", "MODEL", "particle", "model"], ["particle", "MODEL", "sampler", "model"],
      ["positive", "CONDITIONING", "sampler", "positive"], ["negative", "CONDITIONING", "sampler", "negative"],
      ["latent", "LATENT", "sampler", "latent_image"], ["loader", "shield_set", "sampler", "shield_set"],
      ...outputLinks("sampler"), ["sampler", "report", "report", "report"], ["decode", "IMAGE", "report", "images"],
      ["loader", "shield_set", "report", "shield_set"], ["dng", "report", "dngReport", "dng_report"],
      ["sampler", "LATENT", "dngReport", "after"],
    ],
  },
];
