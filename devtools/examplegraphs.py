"""The example workflows the pack ships, built from the real node definitions (``build_examples``), and one
small graph with every indirection the UI-to-API converter resolves, for tests."""

from __future__ import annotations

from exampleparts import (
    ADD_CONTENT_HEIGHT,
    CKPT,
    CKPT_MODELS,
    CONTENT2_IMAGES,
    CONTENT2_LORA,
    CONTENT_LORA,
    GROUP_COLOURS,
    LOADER_HEIGHT,
    NEGATIVE,
    P_C,
    P_C2,
    P_CS,
    P_CS2,
    P_S,
    SAMPLER,
    SAVE_HEIGHT,
    SEED,
    SIZE,
    STYLE_LORA,
    add_apply_and_generate,
    add_loras,
    add_merge,
    add_note,
    add_prompt,
    add_reference_images,
    add_sampling,
    add_save_and_report,
    connect_merge_inputs,
)
from workflowbuilder import Column, WorkflowBuilder
from workflowformat import MODE_BYPASS

# The examples, simplest first. ComfyUI's template browser shows a custom-node template by its file name
# alone (front ends 1.32.9 to 1.49.6: the card's title, and again as its description with "_" and "-" as
# spaces), so the file name is the title; its number keeps the order in an alphabetical listing, and
# web/duolora_templates.js sorts the server's directory-order list by it.
QUICK = "1. Merge two LoRAs in seconds"
WITHOUT_IMAGES = "2. Merge without pictures (each LoRA draws its references)"
WITH_IMAGES = "3. Merge with your own pictures (as in the paper)"
COMPARISON = "4. Compare plain sum, ZipLoRA and DuoLoRA"
KLORA = "5. Subject in a style without merging (K-LoRA)"
MULTI = "6. Several subjects in one style (multi-concept)"
WORKFLOW_NAMES = (QUICK, WITHOUT_IMAGES, WITH_IMAGES, COMPARISON, KLORA, MULTI)


def workflow_with_reference_images(info: dict) -> dict:
    """Example 3: the paper's setting — reference images and prompts of both LoRAs."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3, c4, c5, c6 = (Column(x) for x in (0, 360, 660, 1120, 1580, 2040, 2500))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    add_note(b, c0, (
        "DuoLoRA: merge a content LoRA (your subject) and a style LoRA into one LoRA.\n\n"
        "1. Put both LoRAs in models/loras and pick them in the two loaders.\n"
        "2. Load two pictures of the subject (Image Batch joins them) and one picture in the style, "
        "ideally from the LoRAs' training images, and write each LoRA's prompt.\n"
        "3. Press Run. The merge learns 100 steps (the paper's setting); Save Merged LoRA shows the file it "
        "wrote in models/loras/duolora/, and the KSampler draws with the merged LoRA."), height=250)
    enc_c, enc_s, ref_nodes = add_reference_images(b, ckpt, (c0, c1))
    p_c = add_prompt(b, c2, P_C, "p_c: content LoRA prompt")
    b.connect(ckpt, "CLIP", p_c, "clip")
    p_s = add_prompt(b, c2, P_S, "p_s: style LoRA prompt")
    b.connect(ckpt, "CLIP", p_s, "clip")
    p_cs = add_prompt(b, c2, P_CS, "p_cs: subject in the style")
    b.connect(ckpt, "CLIP", p_cs, "clip")
    content, style = add_loras(b, c3)
    merge = add_merge(b, c4, "ZipRank Merge (DuoLoRA)")
    connect_merge_inputs(b, merge, ckpt, content, style, (enc_c, "LATENT", enc_s, "LATENT"), (p_c, p_s, p_cs))
    save_lora, report = add_save_and_report(b, merge, c4)
    generate = add_apply_and_generate(b, merge, ckpt, (c5, c6), "Negative prompt")
    b.group("Base model", [ckpt], GROUP_COLOURS["model"])
    b.group("Reference images", ref_nodes, GROUP_COLOURS["refs"])
    b.group("Prompts of the two LoRAs", [p_c, p_s, p_cs], GROUP_COLOURS["prompts"])
    b.group("DuoLoRA merge", [content, style, merge, save_lora, report], GROUP_COLOURS["merge"])
    b.group("Generate with the merged LoRA", generate, GROUP_COLOURS["out"])
    return b.build(WITH_IMAGES)


def workflow_without_training_images(info: dict) -> dict:
    """Example 2: no images — each LoRA, picked once in its DuoLoRA loader, draws its own reference latents
    (Apply Merged LoRA applies that loader's LoRA alone) and goes on to the merge."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3, c5, c6, c7 = (Column(x) for x in (0, 460, 920, 1280, 1720, 2180, 2580))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    add_note(b, c0, (
        "No training images? Each LoRA draws its own references: the content LoRA renders p_c, the "
        "style LoRA renders p_s, and ZipRank Merge learns from those latents.\n\n"
        "Pick each LoRA once, in Load Content LoRA and Load Style LoRA: the same loader feeds its drawing "
        "and the merge. Write each LoRA's prompt with its trigger words, then press Run."), height=220)
    duo_loaders = {"content": "DuoLoRA_LoadContentLoRA", "style": "DuoLoRA_LoadStyleLoRA"}
    neg = add_prompt(b, c0, NEGATIVE, "Negative prompt", negative=True)
    b.connect(ckpt, "CLIP", neg, "clip")
    p_cs = add_prompt(b, c0, P_CS, "p_cs: subject in the style")
    b.connect(ckpt, "CLIP", p_cs, "clip")
    rows = {}
    c1.y = c2.y = c3.y = 0
    for which, lora, text, seed in (("content", CONTENT_LORA, P_C, SEED), ("style", STYLE_LORA, P_S, SEED + 1)):
        # Room for the group title between the two rows.
        start = max(c1.y, c2.y, c3.y) + (90 if rows else 0)
        c1.y = c2.y = c3.y = start
        duo = b.add(duo_loaders[which], c1, {"lora_name": lora}, width=320, height=LOADER_HEIGHT)
        apply = b.add("DuoLoRA_ApplyMergedLoRA", c1, title=f"Apply the {which} LoRA alone", width=320)
        b.connect(ckpt, "MODEL", apply, "model")
        b.connect(ckpt, "CLIP", apply, "clip")
        b.connect(duo, f"{which}_lora", apply, "merged_lora")
        prompt = add_prompt(b, c1, text, f"p_{which[0]}: {which} LoRA prompt")
        b.connect(apply, "CLIP", prompt, "clip")
        latent = b.add("EmptyLatentImage", c2, {"width": SIZE, "height": SIZE, "batch_size": 2},
                       title=f"{which.capitalize()} references: size and count", width=300)
        ks = b.add("KSampler", c2, {**SAMPLER, "seed": seed}, title=f"Draw {which} references", width=300)
        b.connect(apply, "MODEL", ks, "model")
        b.connect(prompt, "CONDITIONING", ks, "positive")
        b.connect(neg, "CONDITIONING", ks, "negative")
        b.connect(latent, "LATENT", ks, "latent_image")
        dec = b.add("VAEDecode", c3, width=220)
        b.connect(ks, "LATENT", dec, "samples")
        b.connect(ckpt, "VAE", dec, "vae")
        preview = b.add("PreviewImage", c3, title=f"{which.capitalize()} references", width=380, height=300)
        b.connect(dec, "IMAGE", preview, "images")
        rows[which] = (duo, apply, prompt, latent, ks, dec, preview)
        b.group(f"{which.capitalize()} LoRA draws its references", rows[which],
                GROUP_COLOURS["refs"] if which == "content" else GROUP_COLOURS["prompts"])
    content, style = rows["content"][0], rows["style"][0]
    merge = add_merge(b, c5, "ZipRank Merge (DuoLoRA)")
    connect_merge_inputs(b, merge, ckpt, content, style,
                         (rows["content"][4], "LATENT", rows["style"][4], "LATENT"),
                         (rows["content"][2], rows["style"][2], p_cs))
    save_lora, report = add_save_and_report(b, merge, c5)
    generate = add_apply_and_generate(b, merge, ckpt, (c6, c7), "Negative prompt (merged LoRA)")
    b.group("Base model and shared prompts", [ckpt, neg, p_cs], GROUP_COLOURS["model"])
    b.group("DuoLoRA merge", [merge, save_lora, report], GROUP_COLOURS["merge"])
    b.group("Generate with the merged LoRA", generate, GROUP_COLOURS["out"])
    return b.build(WITHOUT_IMAGES)


def workflow_baseline_comparison(info: dict) -> dict:
    """Example 4: direct merge, ZipLoRA and DuoLoRA side by side (same references, prompt and seed)."""
    b = WorkflowBuilder(info)
    c0, c1, c2 = (Column(x) for x in (0, 360, 660))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    add_note(b, c0, (
        "Three merges of the same two LoRAs, sampled with the same prompt, seed and canvas:\n"
        "- direct: the plain sum of both LoRAs (nothing learned)\n"
        "- ZipLoRA: a learned mask per output column (no priors, no cycle loss)\n"
        "- DuoLoRA: ZipRank masks and SDXL layer priors (the defaults; the Constyle cycle loss is an option)\n\n"
        "Each column encodes the prompt with its own merged CLIP, as a Load LoRA node would."), height=230)
    enc_c, enc_s, ref_nodes = add_reference_images(b, ckpt, (c0, c1))
    p_c = add_prompt(b, c2, P_C, "p_c: content LoRA prompt")
    p_s = add_prompt(b, c2, P_S, "p_s: style LoRA prompt")
    p_cs = add_prompt(b, c2, P_CS, "p_cs: subject in the style")
    for p in (p_c, p_s, p_cs):
        b.connect(ckpt, "CLIP", p, "clip")
    content, style = add_loras(b, c2)
    latent = b.add("EmptyLatentImage", c2, {"width": SIZE, "height": SIZE, "batch_size": 1}, width=300)
    b.group("Base model", [ckpt], GROUP_COLOURS["model"])
    b.group("Reference images", ref_nodes, GROUP_COLOURS["refs"])
    b.group("LoRAs, prompts, canvas", [p_c, p_s, p_cs, content, style, latent], GROUP_COLOURS["prompts"])
    methods = (
        ("direct", "Direct merge (nothing learned)", {"method": "direct", "steps": 0}),
        ("ziplora", "ZipLoRA (per-column masks)", {
            "method": "ziplora_out", "prior_preset": "none", "prior_init": False, "prior_loss": False,
            "constyle_iterations": 0}),
        ("duolora", "DuoLoRA (ZipRank + priors, defaults)", {"method": "ziprank"}),
    )
    x = 1120
    for key, title, widgets in methods:
        cm, ca = Column(x, 0), Column(x + 460, 0)
        merge = add_merge(b, cm, title, **widgets)
        connect_merge_inputs(b, merge, ckpt, content, style, (enc_c, "LATENT", enc_s, "LATENT"), (p_c, p_s, p_cs))
        apply = b.add("DuoLoRA_ApplyMergedLoRA", ca, title=f"Apply ({key})", width=300)
        b.connect(ckpt, "MODEL", apply, "model")
        b.connect(ckpt, "CLIP", apply, "clip")
        b.connect(merge, "merged_lora", apply, "merged_lora")
        pos = add_prompt(b, ca, P_CS, f"Prompt ({key})")
        neg = add_prompt(b, ca, NEGATIVE, f"Negative prompt ({key})", negative=True)
        for p in (pos, neg):
            b.connect(apply, "CLIP", p, "clip")
        members = [merge, apply, pos, neg]
        if key == "duolora":
            save_lora = b.add("DuoLoRA_SaveMergedLoRA", cm, {"filename_prefix": "duolora/compare_duolora"},
                              width=320, height=SAVE_HEIGHT)
            b.connect(merge, "merged_lora", save_lora, "merged_lora")
            report = b.add("DuoLoRA_MergeReport", cm, width=400, height=300)
            b.connect(merge, "stats", report, "stats")
            members += [save_lora, report]
        _, ks, save = add_sampling(b, apply, pos, neg, ckpt, (ca, ca), f"duolora/compare_{key}",
                                   title=f"KSampler ({key})", latent=latent)
        b.group(title, [*members, ks, save], GROUP_COLOURS["merge"] if key == "duolora" else GROUP_COLOURS["out"])
        x += 980
    return b.build(COMPARISON)


def workflow_merge_two_loras(info: dict) -> dict:
    """The quick start: two loaders, ZipRank Merge in weights mode (no pictures, no prompts), Save Merged LoRA
    and Merge Report. The checkpoint only gives the merge the model's layer shapes; nothing is drawn."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3 = (Column(x, 90) for x in (0, 380, 740, 1180))
    add_note(b, c0, (
        "Merge two LoRAs in seconds:\n\n"
        "1. Load Checkpoint: your SDXL model (the merge reads its layer shapes; nothing is drawn).\n"
        "2. Load Content LoRA: your subject LoRA. Load Style LoRA: your style LoRA.\n"
        "3. Press Run.\n"
        "4. Save Merged LoRA shows the file it wrote in models/loras/duolora/. Press R, then pick it in any "
        "Load LoRA node.\n\n"
        "Mode 'weights' needs no pictures; for the paper's method (reference pictures, 100 learning steps) "
        "open the other DuoLoRA templates."), width=340, height=300)
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=340, properties={"models": CKPT_MODELS})
    content, style = add_loras(b, c1)
    merge = add_merge(b, c2, "ZipRank Merge (DuoLoRA)", mode="weights")
    connect_merge_inputs(b, merge, ckpt, content, style, None, None)
    save_lora, report = add_save_and_report(b, merge, c3)
    b.group("Pick two LoRAs, press Run", [ckpt, content, style, merge, save_lora, report],
            GROUP_COLOURS["merge"])
    return b.build(QUICK)


def workflow_klora(info: dict) -> dict:
    """K-LoRA: both LoRAs applied at sampling time, nothing learned, merged or saved."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3 = (Column(x) for x in (0, 360, 720, 1160))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    add_note(b, c0, (
        "K-LoRA: a subject in a style without a merge. No reference images, no merge time, no file: in every "
        "attention layer, at every step, Apply K-LoRA uses one of the two LoRAs, the content LoRA early in "
        "sampling and the style LoRA later.\n\n"
        "Too little subject: lower beta. Too little style: raise beta or alpha. To keep the result as one "
        "LoRA file, merge with ZipRank Merge instead."), height=250)
    content, style = add_loras(b, c1)
    klora = b.add("DuoLoRA_ApplyKLoRA", c1, width=320)
    b.connect(ckpt, "MODEL", klora, "model")
    b.connect(content, "content_lora", klora, "content_lora")
    b.connect(style, "style_lora", klora, "style_lora")
    pos = add_prompt(b, c2, P_CS, "Prompt")
    neg = add_prompt(b, c2, NEGATIVE, "Negative prompt", negative=True)
    for p in (pos, neg):
        b.connect(ckpt, "CLIP", p, "clip")
    latent, ks, save = add_sampling(b, klora, pos, neg, ckpt, (c2, c3), "duolora/klora")
    b.group("Base model", [ckpt], GROUP_COLOURS["model"])
    b.group("K-LoRA (training-free)", [content, style, klora], GROUP_COLOURS["merge"])
    b.group("Generate", [pos, neg, latent, ks, save], GROUP_COLOURS["out"])
    return b.build(KLORA)


def workflow_multi_concept(info: dict) -> dict:
    """Two subjects and one style in one merged LoRA (multi-concept); each subject has its own
    pictures and prompts, and the merged LoRA draws either subject in the style."""
    b = WorkflowBuilder(info)
    c0, c1, c2, c3, c4, c5, c6 = (Column(x) for x in (0, 360, 660, 1120, 1580, 2040, 2500))
    ckpt = b.add("CheckpointLoaderSimple", c0, {"ckpt_name": CKPT}, width=300, properties={"models": CKPT_MODELS})
    add_note(b, c0, (
        "Multi-concept DuoLoRA: two subjects (two content LoRAs) and one style LoRA merged into ONE LoRA, "
        "which draws either subject in the style when its prompt asks for it.\n\n"
        "Load Content LoRA holds the first subject (its pictures and prompts go to ZipRank Merge); Add "
        "Content LoRA adds the second one with its own pictures and prompts. Chain more Add Content LoRA "
        "nodes for more subjects."), height=250)
    enc_c, enc_s, ref_nodes = add_reference_images(b, ckpt, (c0, c1))
    second_img = b.add("LoadImage", c0, {"image": CONTENT2_IMAGES[0]}, title="Second subject image", width=300,
                       height=330)
    c1.y = max(c1.y, b.node(second_img)["pos"][1])
    enc_c2 = b.add("VAEEncode", c1, title="VAE Encode (subject 2)", width=260)
    b.connect(second_img, "IMAGE", enc_c2, "pixels")
    b.connect(ckpt, "VAE", enc_c2, "vae")
    prompts = {}
    for key, text, title in (("p_c", P_C, "p_c: first subject's prompt"), ("p_c2", P_C2, "p_c: second subject's prompt"),
                             ("p_s", P_S, "p_s: style LoRA prompt"), ("p_cs", P_CS, "p_cs: first subject in the style"),
                             ("p_cs2", P_CS2, "p_cs: second subject in the style")):
        prompts[key] = add_prompt(b, c2, text, title)
        b.connect(ckpt, "CLIP", prompts[key], "clip")
    content = b.add("DuoLoRA_LoadContentLoRA", c3, {"lora_name": CONTENT_LORA}, title="Load Content LoRA (subject 1)",
                    width=320, height=LOADER_HEIGHT)
    second = b.add("DuoLoRA_AddContentLoRA", c3, {"lora_name": CONTENT2_LORA}, title="Add Content LoRA (subject 2)",
                   width=320, height=ADD_CONTENT_HEIGHT)
    b.connect(content, "content_lora", second, "content_lora")
    b.connect(enc_c2, "LATENT", second, "content_latents")
    b.connect(prompts["p_c2"], "CONDITIONING", second, "content_prompt")
    b.connect(prompts["p_cs2"], "CONDITIONING", second, "combined_prompt")
    style = b.add("DuoLoRA_LoadStyleLoRA", c3, {"lora_name": STYLE_LORA}, width=320, height=LOADER_HEIGHT)
    merge = add_merge(b, c4, "ZipRank Merge (DuoLoRA)")
    connect_merge_inputs(b, merge, ckpt, second, style, (enc_c, "LATENT", enc_s, "LATENT"),
                         (prompts["p_c"], prompts["p_s"], prompts["p_cs"]), content_output="content_loras")
    save_lora, report = add_save_and_report(b, merge, c3)
    apply = b.add("DuoLoRA_ApplyMergedLoRA", c5, width=320)
    b.connect(ckpt, "MODEL", apply, "model")
    b.connect(ckpt, "CLIP", apply, "clip")
    b.connect(merge, "merged_lora", apply, "merged_lora")
    neg = add_prompt(b, c5, NEGATIVE, "Negative prompt", negative=True)
    b.connect(apply, "CLIP", neg, "clip")
    generate = [apply, neg]
    latent = None
    for i, text in enumerate((P_CS, P_CS2)):
        pos = add_prompt(b, c5, text, f"Prompt (subject {i + 1} in the style)")
        b.connect(apply, "CLIP", pos, "clip")
        c6.y = max(c6.y, b.node(pos)["pos"][1])
        latent, ks, save = add_sampling(b, apply, pos, neg, ckpt, (c5, c6), f"duolora/multi_subject{i + 1}",
                                        title=f"KSampler (subject {i + 1})", latent=latent)
        generate += [pos, ks, save] + ([latent] if i == 0 else [])
    b.group("Base model", [ckpt], GROUP_COLOURS["model"])
    b.group("Reference images", [*ref_nodes, second_img, enc_c2], GROUP_COLOURS["refs"])
    b.group("Prompts of the three LoRAs", list(prompts.values()), GROUP_COLOURS["prompts"])
    b.group("DuoLoRA merge", [content, second, style, merge, save_lora, report], GROUP_COLOURS["merge"])
    b.group("Generate with the merged LoRA", generate, GROUP_COLOURS["out"])
    return b.build(MULTI)


def indirection_example(object_info: dict) -> tuple[dict, dict[str, int]]:
    """A small UI graph with every indirection the converter must resolve, for tests (not an example).

    Checkpoint -> Reroute -> LoraLoader (bypassed) -> KSampler.model; the bypassed loader's CLIP output feeds
    CLIPTextEncode (-> the checkpoint's CLIP); KSampler.seed is a converted widget fed by a front-end-only
    PrimitiveNode (value 1234) and KSampler.steps one fed by the backend node PrimitiveInt (a link); a Note
    sits beside. Returns the workflow and node ids by role.
    """
    b = WorkflowBuilder(object_info)
    col, col2 = Column(0), Column(420)
    ids = {
        "ckpt": b.add("CheckpointLoaderSimple", col, {"ckpt_name": CKPT}),
        "reroute": b.add("Reroute", col, width=80),
        "lora": b.add("LoraLoader", col, {"lora_name": "y.safetensors"}),
        "text": b.add("CLIPTextEncode", col, {"text": "a"}, width=400, height=120),
        "latent": b.add("EmptyLatentImage", col2),
        "steps": b.add("PrimitiveInt", col2, {"value": 7}),
        "ksampler": b.add("KSampler", col2, {"seed": 5, "steps": 20}),
        "note": b.add("Note", col2, {"text": "ignored"}),
        "primitive": b.add("PrimitiveNode", col2, width=240, height=80),
    }
    nodes = {n["id"]: n for n in b.nodes}
    nodes[ids["reroute"]]["inputs"] = [{"name": "", "type": "*", "link": None}]
    nodes[ids["reroute"]]["outputs"] = [{"name": "", "type": "*", "links": []}]
    prim = nodes[ids["primitive"]]
    prim["outputs"] = [{"name": "connect to widget input", "type": "INT", "links": [],
                        "widget": {"name": "seed"}}]
    prim["properties"] = {"Run widget replace on values": False}
    prim["widgets_values"] = [1234, "fixed"]
    ks = nodes[ids["ksampler"]]
    ks["inputs"] += [{"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None},
                     {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": None}]
    nodes[ids["lora"]]["mode"] = MODE_BYPASS

    def link(src: str, slot: int, dst: str, name: str, kind: str) -> None:
        link_id = len(b.links) + 1
        target = nodes[ids[dst]]
        target_slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == name)
        b.links.append([link_id, ids[src], slot, ids[dst], target_slot, kind])
        nodes[ids[src]]["outputs"][slot]["links"].append(link_id)
        target["inputs"][target_slot]["link"] = link_id

    link("ckpt", 0, "reroute", "", "MODEL")
    link("reroute", 0, "lora", "model", "MODEL")
    link("ckpt", 1, "lora", "clip", "CLIP")
    link("lora", 0, "ksampler", "model", "MODEL")
    link("lora", 1, "text", "clip", "CLIP")
    link("text", 0, "ksampler", "positive", "CONDITIONING")
    link("text", 0, "ksampler", "negative", "CONDITIONING")
    link("latent", 0, "ksampler", "latent_image", "LATENT")
    link("primitive", 0, "ksampler", "seed", "INT")
    link("steps", 0, "ksampler", "steps", "INT")
    return b.build("indirection-test"), ids


BUILDERS = {
    QUICK: workflow_merge_two_loras,
    WITHOUT_IMAGES: workflow_without_training_images,
    WITH_IMAGES: workflow_with_reference_images,
    COMPARISON: workflow_baseline_comparison,
    KLORA: workflow_klora,
    MULTI: workflow_multi_concept,
}


def build_examples(object_info: dict) -> dict[str, dict]:
    """Name -> UI workflow of every example, built from ``object_info``."""
    return {name: build(object_info) for name, build in BUILDERS.items()}
