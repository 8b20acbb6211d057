"""M3T-mini: a procedural, seeded stand-in for the M3T dataset.

Each image is a few coloured shapes on a plain background. Every answer is a
function of what is drawn, so a model can only score well by looking at the
image. The output follows the published layouts (M3T, MMEB evaluation,
M-BEIR), so the rest of muco-flow runs the same code on it as on real data.

The generator returns files as ``{relative path: bytes}``; writing them is
the caller's business (a Kedro dataset, or a test's temporary directory).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from muco_flow.data import mmeb_train, schema
from muco_flow.evaluation import mbeir
from muco_flow.modeling import tokens

SHAPE_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (110, 75, 45),
}
SHAPES = ("circle", "square", "triangle", "diamond")
REGIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SIDE_CHOICES = (112, 140, 168, 196, 224)  # multiples of 28, Qwen2-VL's patch grid

# Query phrasings per M3T turn, in turn order. `{region}` is filled in. The
# last phrasing of turns 0-4 is worded as MMEB's instructions are (the sample's
# MMEB sets ask with them), as MMEB-style instructions are among the phrasings
# a real training set would hold.
QUERY_PHRASINGS: tuple[tuple[str, ...], ...] = (
    (
        "What is the main object in the image?",
        "Classify the largest object in this picture.",
        "Name the most prominent object shown.",
        "Represent the given image for classification",
    ),
    (
        "How many shapes are in the image?",
        "Count the objects in this picture.",
        "What is the number of shapes shown?",
        "Represent the given image with the following question: How many shapes are in the image?",
    ),
    (
        "What color is the background?",
        "Describe the background color of the image.",
        "Which color fills the background?",
        "Represent the given image with the following question: What color is the background?",
    ),
    (
        "What color is the shape in the {region}?",
        "In the {region} of the image, what color is the object?",
        "Tell me the color of the object located in the {region}.",
        "Represent the given image with the following question: What color is the shape in the {region}?",
    ),
    (
        "What shape is in the {region}?",
        "Which kind of shape appears in the {region}?",
        "Identify the shape located in the {region}.",
        "Represent the given image with the following question: What shape is in the {region}?",
    ),
    (
        "Write a short title for this picture.",
        "Give this image a creative caption.",
        "Compose a brief poetic title for the scene.",
    ),
    (
        "Find a caption that describes this image.",
        "Retrieve a description matching this picture.",
        "Which sentence describes this image?",
    ),
)

# MMEB-format datasets the sample writes: meta-task, the MuCo parser of the
# Instruct layout (naver-ai/muco eval_configs/image.yaml), and the layout each
# is written in, so that both published layouts are read by every run.
MMEB_DATASETS = {
    "MiniShapes-Cls": {"meta_task": "classification", "parser": "image_cls", "layout": "instruct"},
    "MiniShapes-Count": {"meta_task": "vqa", "parser": "image_qa", "layout": "instruct"},
    "MiniShapes-Color": {"meta_task": "vqa", "parser": "image_qa", "layout": "v1"},
    "MiniShapes-I2T": {"meta_task": "retrieval", "parser": "image_i2t", "layout": "v1"},
    "MiniShapes-T2I": {"meta_task": "retrieval", "parser": "image_t2i", "layout": "instruct"},
    "MiniShapes-Grounding": {"meta_task": "visual_grounding", "parser": "image_i2i_vg", "layout": "instruct"},
}
MMEB_DIR = "eval/mmeb"  # as the HF download: <Dataset>/test-00000-of-00001.parquet or <Dataset>/test/*.parquet
MMEB_IMAGE_ROOT = "eval/mmeb/images"  # as images.zip unzipped; the parquet paths are relative to it

# M-BEIR tasks the sample writes (evaluate.mbeir.tasks); each local pool has its task's name
MBEIR_TASKS = ("minishapes_task0", "minishapes_task3", "minishapes_task6")
MBEIR_DATASET_ID = 10  # after UniIR's ten, 0 VisualNews .. 9 MSCOCO
# The instruction file's prompts by (query modality, candidate modality); image -> text asks as M3T's retrieval turn
MBEIR_PROMPTS = {
    (mbeir.TEXT, mbeir.IMAGE): (
        "Find the image that matches this caption.",
        "Retrieve the picture this caption describes.",
    ),
    (mbeir.IMAGE, mbeir.TEXT): QUERY_PHRASINGS[6],
    (mbeir.IMAGE_TEXT, mbeir.TEXT): (
        "Answer the question about the image.",
        "Look at the image and answer the question.",
    ),
}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    region: str
    box: tuple[int, int, int, int]  # left, top, right, bottom

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def a_label(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.label}"


@dataclass(frozen=True)
class Scene:
    """What one image shows; the first shape is the large, main one."""

    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]

    @property
    def main(self) -> Shape:
        return self.shapes[0]

    def describe(self) -> str:
        others = [s.label for s in self.shapes[1:]]
        text = f"A large {self.main.label} in the {self.main.region}"
        if others:
            text += " with a small " + " and a small ".join(others)
        return text + f" on a {self.background} background."


@dataclass(frozen=True)
class MiniSampleConfig:
    """Sizes and seed of the sample; see conf/base/parameters_sample.yml."""

    seed: int = 0
    train_images: int = 2048
    heldout_images: int = 64
    eval_queries_per_dataset: int = 64
    eval_candidates: int = 10
    mmeb_train_rows: int = 128  # per MMEB-train-format dataset, at most train_images

    def __post_init__(self) -> None:
        for name in ("train_images", "heldout_images", "eval_queries_per_dataset", "mmeb_train_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"M3T-mini config: {name} must be at least 1, got {getattr(self, name)}")
        if not 2 <= self.eval_candidates <= self.eval_queries_per_dataset:
            raise ValueError(
                "M3T-mini config: eval_candidates must be between 2 and eval_queries_per_dataset "
                f"({self.eval_queries_per_dataset}), got {self.eval_candidates}"
            )


def sample_scene(rng: random.Random) -> Scene:
    """Draws a scene at random: 1-4 shapes, each in its own quadrant."""
    width, height = rng.choice(SIDE_CHOICES), rng.choice(SIDE_CHOICES)
    n_shapes = rng.randint(1, 4)
    regions = rng.sample(REGIONS, n_shapes)
    # Distinct colours: the main object is then also the largest area of its
    # colour, and "the red one" always names a single shape.
    colours = rng.sample(list(SHAPE_COLOURS), n_shapes)
    shapes = []
    for i, (region, colour) in enumerate(zip(regions, colours, strict=True)):
        # The main shape fills most of its quadrant, the others about half, so
        # "main object" is visually unambiguous.
        fill = 0.9 if i == 0 else 0.5
        qw, qh = width // 2, height // 2
        side = int(min(qw, qh) * fill)
        x0 = (qw if "right" in region else 0) + (qw - side) // 2
        y0 = (qh if "bottom" in region else 0) + (qh - side) // 2
        shapes.append(
            Shape(
                kind=rng.choice(SHAPES),
                colour=colour,
                region=region,
                box=(x0, y0, x0 + side, y0 + side),
            )
        )
    return Scene(width, height, rng.choice(list(BACKGROUNDS)), tuple(shapes))


def render_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        colour = SHAPE_COLOURS[shape.colour]
        left, top, right, bottom = shape.box
        cx, cy = (left + right) // 2, (top + bottom) // 2
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=colour)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=colour)
        elif shape.kind == "triangle":
            draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=colour)
        else:
            draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=colour)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _other(rng: random.Random, options: tuple[str, ...] | list[str], exclude: str) -> str:
    return rng.choice([o for o in options if o != exclude])


def _title(rng: random.Random, scene: Scene) -> str:
    n = len(scene.shapes)
    templates = (
        "{main} alone on {bg}" if n == 1 else "{main} leading {rest} on {bg}",
        "a {bg} stage for {main}" if n == 1 else "{main} and {rest} gathered on {bg}",
    )
    return rng.choice(templates).format(
        main=scene.main.a_label, rest=f"{NUMBER_WORDS[n - 1]} companions", bg=scene.background
    )


def m3t_turns(rng: random.Random, scene: Scene) -> dict[str, list]:
    """The seven M3T turns of a scene: phrasings, answers, sentences, negatives."""
    colour_shape = scene.shapes[rng.randrange(len(scene.shapes))]
    kind_shape = scene.shapes[rng.randrange(len(scene.shapes))]
    n = len(scene.shapes)
    title = _title(rng, scene)
    wrong_scene = Scene(
        scene.width,
        scene.height,
        _other(rng, list(BACKGROUNDS), scene.background),
        (replace(scene.main, colour=_other(rng, list(SHAPE_COLOURS), scene.main.colour)), *scene.shapes[1:]),
    )
    answers = [
        (
            scene.main.label,
            f"The main object is {scene.main.a_label}.",
            f"{_other(rng, list(SHAPE_COLOURS), scene.main.colour)} {scene.main.kind}",
        ),
        (
            NUMBER_WORDS[n],
            f"There are {NUMBER_WORDS[n]} shapes in the image.",
            _other(rng, NUMBER_WORDS[1:], NUMBER_WORDS[n]),
        ),
        (scene.background, f"The background is {scene.background}.", _other(rng, list(BACKGROUNDS), scene.background)),
        (
            colour_shape.colour,
            f"The shape in the {colour_shape.region} is {colour_shape.colour}.",
            _other(rng, list(SHAPE_COLOURS), colour_shape.colour),
        ),
        (
            kind_shape.kind,
            f"The shape in the {kind_shape.region} is a {kind_shape.kind}.",
            _other(rng, SHAPES, kind_shape.kind),
        ),
        (title, f"A fitting title is: {title}.", _title(rng, wrong_scene)),
        (scene.describe(), scene.describe(), wrong_scene.describe()),
    ]
    regions = [None, None, None, colour_shape.region, kind_shape.region, None, None]
    qry = [
        [p.format(region=region) if region else p for p in phrasings]
        for phrasings, region in zip(QUERY_PHRASINGS, regions, strict=True)
    ]
    return {
        schema.QRY: qry,
        schema.POS_TEXT: [a[0] for a in answers],
        schema.POS_SENTENCE: [a[1] for a in answers],
        schema.NEG_TEXT: [a[2] for a in answers],
    }


Seeded = tuple[random.Random, Scene]


def _scenes(seed: int, split: str, count: int, exclude: frozenset[Scene] = frozenset()) -> list[Seeded]:
    """``count`` seeded scenes of one split, none equal to a scene in ``exclude``."""
    scenes: list[Seeded] = []
    attempt = 0
    with tqdm(total=count, desc=f"M3T-mini {split}", unit="image", disable=count < 1000) as progress:
        while len(scenes) < count:
            # A string seed is hashed with SHA-512: stable across runs and
            # PYTHONHASHSEED, and scene i does not depend on how many follow.
            rng = random.Random(f"m3t-mini:{seed}:{split}:{attempt}")
            attempt += 1
            scene = sample_scene(rng)
            if scene not in exclude:
                scenes.append((rng, scene))
                progress.update()
    return scenes


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _m3t_files(split: str, scenes: list[Seeded], meta_file: str) -> dict[str, bytes]:
    """The published M3T columns and nothing else: no id column, phrasings with ``<|image_1|>\\n``."""
    files: dict[str, bytes] = {}
    rows: dict[str, list] = {f.name: [] for f in schema.M3T_ARROW_SCHEMA}
    for index, (rng, scene) in enumerate(scenes):
        image_path = f"images/{split}/{index:06d}.png"
        files[image_path] = png_bytes(render_scene(scene))
        turns = m3t_turns(rng, scene)
        turns[schema.QRY] = [[f"{tokens.IMAGE_1}\n{p}" for p in phrasings] for phrasings in turns[schema.QRY]]
        for column, value in turns.items():
            rows[column].append(value)
        rows[schema.QRY_SENTENCE].append(scene.describe())
        rows[schema.QRY_IMAGE_PATH].append(image_path)
        rows[schema.POS_IMAGE_PATH].append("")
    files[meta_file] = _parquet_bytes(pa.table(rows, schema=schema.M3T_ARROW_SCHEMA))
    return files


def _crop_bytes(scene: Scene, shape: Shape) -> bytes:
    left, top, right, bottom = shape.box
    pad = 4
    box = (max(left - pad, 0), max(top - pad, 0), min(right + pad, scene.width), min(bottom + pad, scene.height))
    crop = render_scene(scene).crop(box)
    # MuCo's loader upscales anything under 28 px; the crops never need it.
    return png_bytes(crop)


def _mmeb_row(
    layout: str, qry_inst: str, qry_text: str, qry_img: str, tgt_inst: str, tgt_text: list[str], tgt_img: list[str]
) -> dict:
    """A row in ``layout``: Instruct keeps the instructions apart; v1 folds them into the text, as published.

    The v1 texts are what MuCo's Instruct parsers rebuild "to stay consistent
    with v1 eval" (naver-ai/muco src/data/eval_dataset/image_*.py).
    """
    if layout == "instruct":
        return {
            "qry_inst": qry_inst,
            "qry_text": qry_text,
            "qry_img_path": qry_img,
            "tgt_inst": tgt_inst,
            "tgt_text": tgt_text,
            "tgt_img_path": tgt_img,
        }
    joined = f"{qry_inst} {qry_text}".strip() + "\n"
    targets = [f"{tgt_inst} {t}".strip() + "\n" if tgt_inst else t for t in tgt_text]
    return {"qry_text": joined, "qry_img_path": qry_img, "tgt_text": targets, "tgt_img_path": tgt_img}


def _mmeb_files(config: MiniSampleConfig, scenes: list[Seeded]) -> dict[str, bytes]:
    n = len(scenes)
    files: dict[str, bytes] = {}
    image_paths = [f"MiniShapes/{i:06d}.png" for i in range(n)]
    for path, (_, scene) in zip(image_paths, scenes, strict=True):
        files[f"{MMEB_IMAGE_ROOT}/{path}"] = png_bytes(render_scene(scene))
    crop_paths = [f"MiniShapes-crops/{i:06d}.png" for i in range(n)]
    for path, (_, scene) in zip(crop_paths, scenes, strict=True):
        files[f"{MMEB_IMAGE_ROOT}/{path}"] = _crop_bytes(scene, scene.main)

    labels = [f"{c} {s}" for c in SHAPE_COLOURS for s in SHAPES]
    rng = random.Random(f"m3t-mini:{config.seed}:mmeb")
    k = config.eval_candidates
    image = tokens.IMAGE_1

    def distractors(correct: str, pool: list[str]) -> list[str]:
        return rng.sample([p for p in pool if p != correct], min(k - 1, len(pool) - 1))

    def text_candidates(correct: str, pool: list[str]) -> tuple[list[str], list[str]]:
        candidates = [correct, *distractors(correct, pool)]
        return candidates, [""] * len(candidates)

    # the instructions follow the wording of MMEB's own sets
    rows: dict[str, list[tuple]] = {name: [] for name in MMEB_DATASETS}
    descriptions = [scene.describe() for _, scene in scenes]
    for i, (_, scene) in enumerate(scenes):
        path = image_paths[i]
        rows["MiniShapes-Cls"].append(
            (
                f"{image}\nRepresent the given image for classification",
                "",
                path,
                "",
                *text_candidates(scene.main.label, labels),
            )
        )
        question = f"{image}\nRepresent the given image with the following question:"
        rows["MiniShapes-Count"].append(
            (
                question,
                "How many shapes are in the image?",
                path,
                "",
                *text_candidates(NUMBER_WORDS[len(scene.shapes)], list(NUMBER_WORDS[1:])),
            )
        )
        rows["MiniShapes-Color"].append(
            (
                question,
                f"What color is the shape in the {scene.main.region}?",
                path,
                "",
                *text_candidates(scene.main.colour, list(SHAPE_COLOURS)),
            )
        )
        rows["MiniShapes-I2T"].append(
            (
                f"{image}\nFind a caption that describes this image.",
                "",
                path,
                "",
                *text_candidates(descriptions[i], descriptions),
            )
        )
        others = [p for p in image_paths if p != path]
        rows["MiniShapes-T2I"].append(
            (
                "Find me an everyday image that matches the given caption:",
                descriptions[i],
                "",
                f"{image}\nRepresent the given image.",
                [""] * k,
                [path, *rng.sample(others, k - 1)],
            )
        )
        other_crops = [p for j, p in enumerate(crop_paths) if j != i]
        rows["MiniShapes-Grounding"].append(
            (
                f"{image}\nSelect the portion of the image that isolates the object labeled as",
                scene.main.label,
                path,
                f"{image}\nRepresent the given cropped image of the object.",
                [""] * k,
                [crop_paths[i], *rng.sample(other_crops, k - 1)],
            )
        )
    for name, dataset_rows in rows.items():
        layout = MMEB_DATASETS[name]["layout"]
        table = pa.Table.from_pylist([_mmeb_row(layout, *row) for row in dataset_rows])
        # the two file layouts of the HF download
        file = "test/0000.parquet" if layout == "instruct" else "test-00000-of-00001.parquet"
        files[f"{MMEB_DIR}/{name}/{file}"] = _parquet_bytes(table)
    return files


# MMEB-train-format datasets (stage 2), one per kind of MMEB training set; the
# hard negatives are stored in each of the shapes MuCo's loader reads.
MMEB_TRAIN_DATASETS = {
    "MiniShapes-Cls": "list",  # neg_* as list columns (numpy arrays in pandas)
    "MiniShapes-VQA": "python",  # neg_* as Python list literals in a string column
    "MiniShapes-I2T": "json",  # neg_* as JSON lists in a string column
    "MiniShapes-T2I": "list",  # images on the target and negative sides
}


def _mmeb_train_files(config: MiniSampleConfig, scenes: list[Seeded]) -> dict[str, bytes]:
    """Stage-2 data in MuCo's MMEB-train layout, on the training images (no new image files)."""
    rng = random.Random(f"m3t-mini:{config.seed}:mmeb-train")
    count = min(config.mmeb_train_rows, len(scenes))
    paths = [f"images/train/{i:06d}.png" for i in range(len(scenes))]  # as _m3t_files writes them
    labels = [f"{c} {s}" for c in SHAPE_COLOURS for s in SHAPES]
    image = tokens.IMAGE_1
    rows: dict[str, list[dict]] = {name: [] for name in MMEB_TRAIN_DATASETS}
    for i, (_, scene) in enumerate(scenes[:count]):
        description = scene.describe()
        other = rng.choice([j for j in range(len(scenes)) if j != i]) if len(scenes) > 1 else i
        n = len(scene.shapes)
        common = {
            mmeb_train.QRY_IMAGE_PATH: paths[i],
            mmeb_train.POS_IMAGE_PATH: "",
            mmeb_train.QRY_SENTENCE: description,
        }
        rows["MiniShapes-Cls"].append(
            common
            | {
                mmeb_train.QRY: f"{image}\nRepresent the given image for classification\n",
                mmeb_train.POS_TEXT: scene.main.label,
                mmeb_train.POS_SENTENCE: f"The main object is {scene.main.a_label}.",
                mmeb_train.NEG_TEXT: rng.sample([x for x in labels if x != scene.main.label], 2),
                mmeb_train.NEG_IMAGE_PATH: [""],
            }
        )
        rows["MiniShapes-VQA"].append(
            common
            | {
                mmeb_train.QRY: f"{image}\nRepresent the given image with the following question: "
                "How many shapes are in the image?\n",
                mmeb_train.POS_TEXT: NUMBER_WORDS[n],
                mmeb_train.POS_SENTENCE: f"There are {NUMBER_WORDS[n]} shapes in the image.",
                mmeb_train.NEG_TEXT: repr(rng.sample([w for w in NUMBER_WORDS[1:] if w != NUMBER_WORDS[n]], 2)),
                mmeb_train.NEG_IMAGE_PATH: repr([""]),
            }
        )
        rows["MiniShapes-I2T"].append(
            common
            | {
                mmeb_train.QRY: f"{image}\nFind a caption that describes this image.\n",
                mmeb_train.POS_TEXT: description,
                mmeb_train.POS_SENTENCE: description,
                mmeb_train.NEG_TEXT: json.dumps([scenes[other][1].describe()]),
                mmeb_train.NEG_IMAGE_PATH: json.dumps([""]),
            }
        )
        rows["MiniShapes-T2I"].append(
            {
                mmeb_train.QRY: f"Find me an everyday image that matches the given caption: {description}\n",
                mmeb_train.QRY_IMAGE_PATH: "",
                mmeb_train.QRY_SENTENCE: "",
                mmeb_train.POS_TEXT: f"{image}\nRepresent the given image.\n",
                mmeb_train.POS_IMAGE_PATH: paths[i],
                mmeb_train.POS_SENTENCE: description,
                mmeb_train.NEG_TEXT: [f"{image}\nRepresent the given image.\n"],
                mmeb_train.NEG_IMAGE_PATH: [paths[other]],
            }
        )
    return {
        mmeb_train.META_GLOB.replace("*/*", f"{name}/{name}"): _parquet_bytes(pa.Table.from_pylist(dataset_rows))
        for name, dataset_rows in rows.items()
    }


def _mbeir_files(scenes: list[Seeded]) -> dict[str, bytes]:
    """An M-BEIR download (evaluation/mbeir.py's layout) of three tasks over ``scenes``, a third each.

    Task 0 (text -> image) asks for an image by its caption; task 3
    (image -> text) asks for either of an image's two captions; task 6
    (image, text -> text) asks a question about an image, answered from a
    pool of every possible short answer. The tasks use separate scenes, so
    no query is itself an item of the global pool.
    """
    per_task = len(scenes) // len(MBEIR_TASKS)
    task0, task3, task6 = (scenes[i * per_task : (i + 1) * per_task] for i in range(len(MBEIR_TASKS)))
    files: dict[str, bytes] = {}
    pools: dict[str, list[dict]] = {name: [] for name in MBEIR_TASKS}  # by task: each has its own pool
    queries: dict[str, list[dict]] = {name: [] for name in MBEIR_TASKS}
    # qids and dids are "<dataset id>:<index>", each in its own numbering
    dids, qids = iter(range(1, 1_000_000)), iter(range(1, 1_000_000))

    def image(name: str, index: int, scene: Scene) -> str:
        path = f"{mbeir.IMAGES_DIR}/minishapes_images/{name}/{index:06d}.png"
        files[f"{schema.MBEIR_DIR}/{path}"] = png_bytes(render_scene(scene))
        return path

    def candidate(pool: str, txt: str | None, img_path: str | None) -> str:
        did = f"{MBEIR_DATASET_ID}:{next(dids)}"
        modality = ",".join(m for m, v in ((mbeir.IMAGE, img_path), (mbeir.TEXT, txt)) if v)
        pools[pool].append({"txt": txt, "img_path": img_path, "modality": modality, "did": did, "src_content": None})
        return did

    def query(task: str, txt: str | None, img_path: str | None, positives: list[str]) -> None:
        modality = ",".join(m for m, v in ((mbeir.IMAGE, img_path), (mbeir.TEXT, txt)) if v)
        cand_modality = next(c["modality"] for c in pools[task] if c["did"] == positives[0])
        queries[task].append(
            {
                "qid": f"{MBEIR_DATASET_ID}:{next(qids)}",
                "query_txt": txt,
                "query_img_path": img_path,
                "query_modality": modality,
                "query_src_content": None,
                "pos_cand_list": positives,
                "neg_cand_list": [],
                "task_id": mbeir.TASK_IDS[(modality, cand_modality)],
            }
        )

    name0, name3, name6 = MBEIR_TASKS
    for i, (_, scene) in enumerate(task0):
        did = candidate(name0, None, image(name0, i, scene))
        query(name0, scene.describe(), None, [did])
    for i, (_, scene) in enumerate(task3):
        captions = [candidate(name3, text, None) for text in (scene.describe(), _paraphrase(scene))]
        query(name3, None, image(name3, i, scene), captions)
    answers = [*NUMBER_WORDS[1:], *BACKGROUNDS, *SHAPE_COLOURS, *SHAPES]
    answer_dids = {answer: candidate(name6, answer, None) for answer in answers}
    for i, (rng, scene) in enumerate(task6):
        shape = scene.shapes[rng.randrange(len(scene.shapes))]
        question, answer = (
            (QUERY_PHRASINGS[1][0], NUMBER_WORDS[len(scene.shapes)]),
            (QUERY_PHRASINGS[2][0], scene.background),
            (QUERY_PHRASINGS[3][0].format(region=shape.region), shape.colour),
            (QUERY_PHRASINGS[4][0].format(region=shape.region), shape.kind),
        )[i % 4]
        query(name6, question, image(name6, i, scene), [answer_dids[answer]])

    def jsonl(records: list[dict]) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in records).encode()

    for name, pool in pools.items():
        files[f"{schema.MBEIR_DIR}/{mbeir.query_file(name)}"] = jsonl(queries[name])
        files[f"{schema.MBEIR_DIR}/{mbeir.local_pool_file(name)}"] = jsonl(pool)
    files[f"{schema.MBEIR_DIR}/{mbeir.GLOBAL_POOL_FILE}"] = jsonl([c for pool in pools.values() for c in pool])
    header = [*mbeir.INSTRUCTION_COLUMNS, *(f"prompt_{n}" for n in range(1, 5))]
    lines = [header] + [
        [query_modality, cand_modality, "MiniShapes", str(MBEIR_DATASET_ID), *prompts, *[""] * (4 - len(prompts))]
        for (query_modality, cand_modality), prompts in MBEIR_PROMPTS.items()
    ]
    files[f"{schema.MBEIR_DIR}/{mbeir.INSTRUCTIONS_FILE}"] = "".join("\t".join(line) + "\n" for line in lines).encode()
    return files


def _paraphrase(scene: Scene) -> str:
    others = len(scene.shapes) - 1
    company = f" and {NUMBER_WORDS[others]} smaller shape{'s' if others > 1 else ''}" if others else " alone"
    return f"A picture showing {scene.main.a_label}{company}, background {scene.background}."


def generate_m3t_mini(config: MiniSampleConfig) -> dict[str, bytes]:
    """Every file of the sample, keyed by its path relative to the snapshot root.

    Train, held-out and evaluation images come from separate seeded streams,
    and a held-out or evaluation scene equal to a training scene is skipped,
    so no evaluation image is ever seen in training.
    """
    train = _scenes(config.seed, "train", config.train_images)
    seen = frozenset(scene for _, scene in train)
    heldout = _scenes(config.seed, "heldout", config.heldout_images, exclude=seen)
    evaluation = _scenes(config.seed, "eval", config.eval_queries_per_dataset, exclude=seen)
    files = _m3t_files("train", train, schema.TRAIN_META_FILE)
    files |= _mmeb_train_files(config, train)
    files |= _m3t_files("heldout", heldout, schema.HELDOUT_META_FILE)
    files |= _mmeb_files(config, evaluation)
    files |= _mbeir_files(
        _scenes(config.seed, "mbeir", len(MBEIR_TASKS) * config.eval_queries_per_dataset, exclude=seen)
    )
    return files
