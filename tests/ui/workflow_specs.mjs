// Source of the example workflows: node lists and links by name. build_workflows.mjs turns each spec into
// ComfyUI workflow JSON inside a real front end (so widget order, slots and links are what ComfyUI writes).
export const CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors";
// The real model files the Flux and WAN workflows name (ComfyUI's own Flux / WAN 2.1 examples); the UI test maps
// them to tiny random files (TINY_FOR_REAL in tests/ui/make_tiny_models.py).
export const FLUX_FILES = { unet: "flux1-dev.safetensors", clip_l: "clip_l.safetensors",
  t5: "t5xxl_fp16.safetensors", vae: "ae.safetensors" };
export const WAN_FILES = { unet: "wan2.1_t2v_1.3B_fp16.safetensors",
  t5: "umt5_xxl_fp8_e4m3fn_scaled.safetensors", vae: "wan_2.1_vae.safetensors" };
export const INPAINT_IMAGE = "example.png";   // ComfyUI's default Load Image file; paint the mask in MaskEditor

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
  {
    file: "spell_inpaint_shield_set",
    nodes: {
      ckpt: ckpt(20, 80),
      loader: { type: "ShieldSetLoader", pos: [20, 260], size: [340, 230],
        widgets: { folder: "shields", width: 512, height: 512, resize: "center-crop" } },
      image: { type: "LoadImage", pos: [20, 540], size: [340, 380], widgets: { image: INPAINT_IMAGE } },
      spell: { type: "ShieldedApplySpell", pos: [780, 40], size: [360, 330],
        widgets: { radius: 0.3, intra_batch: false, history: false, init_image_shield: "leave it" } },
      positive: text(380, 40, "a watercolor painting of a lighthouse at dusk", "Positive"),
      negative: text(380, 260, "blurry, low quality", "Negative"),
      encode: { type: "VAEEncode", pos: [400, 540] },
      mask: { type: "SetLatentNoiseMask", pos: [400, 660], size: [260, 70] },
      sampler: { type: "KSampler", pos: [1180, 40],
        widgets: { seed: 42, steps: 25, cfg: 7.0, sampler_name: "euler", scheduler: "normal", denoise: 0.85 } },
      decode: decode(1540, 40),
      save: save(1760, 40, "spell_inpaint"),
      note: { ...note(780, 500, "Inpainting with a shield set (SPELL, Kirchhof et al. 2025). Right-click Load Image -> " +
        "Open in MaskEditor and paint the area to repaint (an empty mask leaves nothing SPELL may move: it warns " +
        "and the output stays inside a shield). Set Latent Noise Mask keeps the rest of the image exactly; Apply " +
        "SPELL measures the whole image the sampler will produce and moves only the masked part, so every " +
        "output ends at least 'radius' from each image in ComfyUI/input/shields/. A small mask over a protected " +
        "image needs a large change inside it. init_image_shield: 'leave it' also leaves a protected image you " +
        "edit; 'exclude it' lets the edit stay close to it. Model: v1-5-pruned-emaonly-fp16.safetensors " +
        "(models/checkpoints); with an inpainting model (sd-v1-5-inpainting) use InpaintModelConditioning + " +
        "its noise mask instead of VAE Encode + Set Latent Noise Mask."), size: [440, 270] },
    },
    links: [
      ["ckpt", "CLIP", "positive", "clip"], ["ckpt", "CLIP", "negative", "clip"], ["ckpt", "VAE", "loader", "vae"],
      ["ckpt", "MODEL", "spell", "model"], ["loader", "shield_set", "spell", "shield_set"],
      ["image", "IMAGE", "encode", "pixels"], ["ckpt", "VAE", "encode", "vae"],
      ["encode", "LATENT", "mask", "samples"], ["image", "MASK", "mask", "mask"],
      ["spell", "MODEL", "sampler", "model"], ["positive", "CONDITIONING", "sampler", "positive"],
      ["negative", "CONDITIONING", "sampler", "negative"], ["mask", "LATENT", "sampler", "latent_image"],
      ...outputLinks("sampler"),
    ],
  },
  {
    file: "spell_hires_fix",
    nodes: {
      ckpt: ckpt(20, 80),
      loader: { type: "ShieldSetLoader", pos: [20, 260], size: [340, 230],
        widgets: { folder: "shields", width: 512, height: 512, resize: "center-crop" } },
      positive: text(380, 40, "a watercolor painting of a lighthouse at dusk", "Positive"),
      negative: text(380, 260, "blurry, low quality", "Negative"),
      latent: latent(380, 480, 2),
      spell: { type: "ShieldedApplySpell", pos: [780, 40], size: [360, 330],
        widgets: { radius: 0.3, intra_batch: true, history: false } },
      sampler: { type: "KSampler", pos: [1180, 40], title: "KSampler (first pass)",
        widgets: { seed: 42, steps: 25, cfg: 7.0, sampler_name: "euler", scheduler: "normal", denoise: 1.0 } },
      upscale: { type: "LatentUpscaleBy", pos: [1180, 340], widgets: { upscale_method: "nearest-exact", scale_by: 1.5 } },
      hires: { type: "KSampler", pos: [1540, 40], title: "KSampler (hires pass)",
        widgets: { seed: 43, steps: 20, cfg: 7.0, sampler_name: "euler", scheduler: "normal", denoise: 0.5 } },
      decode: decode(1900, 40),
      save: save(1900, 160, "spell_hires"),
      note: note(780, 500, "Hires fix with SPELL on both passes: one Apply SPELL model feeds the first KSampler " +
        "and, after Upscale Latent By, the second KSampler at denoise 0.5. The shields are loaded at the first " +
        "pass's size (512); for the hires pass SPELL resizes them to its latent size and compares there (the " +
        "radius is per latent element, so it means the same at both sizes). Protected images go in " +
        "ComfyUI/input/shields/. Model: v1-5-pruned-emaonly-fp16.safetensors (models/checkpoints)."),
    },
    links: [
      ["ckpt", "CLIP", "positive", "clip"], ["ckpt", "CLIP", "negative", "clip"], ["ckpt", "VAE", "loader", "vae"],
      ["ckpt", "MODEL", "spell", "model"], ["loader", "shield_set", "spell", "shield_set"],
      ["spell", "MODEL", "sampler", "model"], ["positive", "CONDITIONING", "sampler", "positive"],
      ["negative", "CONDITIONING", "sampler", "negative"], ["latent", "LATENT", "sampler", "latent_image"],
      ["sampler", "LATENT", "upscale", "samples"],
      ["spell", "MODEL", "hires", "model"], ["positive", "CONDITIONING", "hires", "positive"],
      ["negative", "CONDITIONING", "hires", "negative"], ["upscale", "LATENT", "hires", "latent_image"],
      ["hires", "LATENT", "decode", "samples"], ["ckpt", "VAE", "decode", "vae"], ["decode", "IMAGE", "save", "images"],
    ],
  },
  {
    file: "spell_flux_shield_folder",
    nodes: {
      unet: { type: "UNETLoader", pos: [20, 40], size: [340, 90],
        widgets: { unet_name: FLUX_FILES.unet, weight_dtype: "default" } },
      clip: { type: "DualCLIPLoader", pos: [20, 180], size: [340, 130],
        widgets: { clip_name1: FLUX_FILES.clip_l, clip_name2: FLUX_FILES.t5, type: "flux" } },
      vae: { type: "VAELoader", pos: [20, 360], size: [340, 60], widgets: { vae_name: FLUX_FILES.vae } },
      loader: { type: "ShieldSetLoader", pos: [20, 470], size: [340, 230],
        widgets: { folder: "shields", width: 1024, height: 1024, resize: "center-crop" } },
      positive: text(380, 40, "a watercolor painting of a lighthouse at dusk", "Prompt"),
      guidance: { type: "FluxGuidance", pos: [380, 250], widgets: { guidance: 3.5 } },
      latent: { type: "EmptySD3LatentImage", pos: [380, 370],
        widgets: { width: 1024, height: 1024, batch_size: 2 } },
      spell: { type: "ShieldedApplySpell", pos: [780, 40], size: [360, 330],
        widgets: { radius: 0.3, intra_batch: true, history: false } },
      guider: { type: "BasicGuider", pos: [1180, 40] },
      noise: { type: "RandomNoise", pos: [1180, 140], widgets: { noise_seed: 42 } },
      samplerSelect: { type: "KSamplerSelect", pos: [1180, 260], widgets: { sampler_name: "euler" } },
      sigmas: { type: "BasicScheduler", pos: [1180, 360],
        widgets: { scheduler: "simple", steps: 20, denoise: 1.0 } },
      custom: { type: "SamplerCustomAdvanced", pos: [1540, 40], size: [300, 330] },
      decode: decode(1880, 40),
      save: save(1880, 160, "spell_flux"),
      note: note(780, 480, "Flux with a protected folder: cfg 1 (BasicGuider, one model call per step) with " +
        "FluxGuidance 3.5, sampled by SamplerCustomAdvanced. Apply SPELL corrects the guider's final prediction, " +
        "so every output ends at least 'radius' from each image in ComfyUI/input/shields/ (encoded once with " +
        "the Flux VAE at the width/height you generate at) and from the other images of the batch. Models: " +
        "flux1-dev.safetensors in models/diffusion_models (or flux1-schnell with 4 steps), clip_l.safetensors " +
        "and t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn) in models/text_encoders, ae.safetensors in models/vae."),
    },
    links: [
      ["clip", "CLIP", "positive", "clip"], ["positive", "CONDITIONING", "guidance", "conditioning"],
      ["vae", "VAE", "loader", "vae"], ["unet", "MODEL", "spell", "model"],
      ["loader", "shield_set", "spell", "shield_set"], ["spell", "MODEL", "guider", "model"],
      ["guidance", "CONDITIONING", "guider", "conditioning"], ["unet", "MODEL", "sigmas", "model"],
      ["noise", "NOISE", "custom", "noise"], ["guider", "GUIDER", "custom", "guider"],
      ["samplerSelect", "SAMPLER", "custom", "sampler"], ["sigmas", "SIGMAS", "custom", "sigmas"],
      ["latent", "LATENT", "custom", "latent_image"], ["custom", "output", "decode", "samples"],
      ["vae", "VAE", "decode", "vae"], ["decode", "IMAGE", "save", "images"],
    ],
  },
  {
    file: "spell_wan_video_batch",
    nodes: {
      unet: { type: "UNETLoader", pos: [20, 40], size: [340, 90],
        widgets: { unet_name: WAN_FILES.unet, weight_dtype: "default" } },
      clip: { type: "CLIPLoader", pos: [20, 180], size: [340, 100], widgets: { clip_name: WAN_FILES.t5, type: "wan" } },
      vae: { type: "VAELoader", pos: [20, 330], size: [340, 60], widgets: { vae_name: WAN_FILES.vae } },
      shift: { type: "ModelSamplingSD3", pos: [380, 440], widgets: { shift: 8.0 } },
      positive: text(380, 40, "a red fox running through snow, cinematic", "Positive"),
      negative: text(380, 250, "static, blurry, low quality", "Negative"),
      latent: { type: "EmptyHunyuanLatentVideo", pos: [380, 560],
        widgets: { width: 832, height: 480, length: 33, batch_size: 2 } },
      spell: { type: "ShieldedApplySpell", pos: [780, 40], size: [360, 330],
        widgets: { radius: 0.2, intra_batch: true, history: false } },
      sampler: { type: "KSampler", pos: [1180, 40],
        widgets: { seed: 42, steps: 30, cfg: 6.0, sampler_name: "uni_pc", scheduler: "simple" } },
      decode: decode(1540, 40),
      save: { type: "SaveAnimatedWEBP", pos: [1540, 160], size: [340, 420],
        widgets: { filename_prefix: "spell_wan", fps: 16, lossless: false, quality: 90 } },
      note: note(780, 480, "A short WAN 2.1 video batch with intra-batch SPELL: each clip of the batch is one item " +
        "(all its frames together), and SPELL keeps every clip at least 'radius' (per latent element) from the " +
        "other clips, so the batch gives different videos instead of near-copies. Add a Shield Set Loader " +
        "(WAN VAE, same frame count) to also protect clips. The animated WEBP holds the clips one after the " +
        "other. Models: wan2.1_t2v_1.3B_fp16.safetensors in models/diffusion_models, " +
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors in models/text_encoders, wan_2.1_vae.safetensors in models/vae."),
    },
    links: [
      ["clip", "CLIP", "positive", "clip"], ["clip", "CLIP", "negative", "clip"],
      ["unet", "MODEL", "shift", "model"], ["shift", "MODEL", "spell", "model"],
      ["spell", "MODEL", "sampler", "model"], ["positive", "CONDITIONING", "sampler", "positive"],
      ["negative", "CONDITIONING", "sampler", "negative"], ["latent", "LATENT", "sampler", "latent_image"],
      ["sampler", "LATENT", "decode", "samples"], ["vae", "VAE", "decode", "vae"], ["decode", "IMAGE", "save", "images"],
    ],
  },
];
