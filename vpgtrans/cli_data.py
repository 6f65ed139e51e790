"""``vpgtrans data ...``: the data helpers' commands (a Typer sub-app over ``vpgtrans.data_convert``).

``build_data_app(wrap)`` returns the sub-app; ``wrap`` is the main CLI's error wrapper (one line, exit 2), so
these commands fail like every other. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Out = Annotated[Path, typer.Option(help="Output data directory (data.jsonl + vpgtrans_data.json).")]
ImageRoot = Annotated[Path, typer.Option(help="The directory holding COCO's image folders (train2014/, val2014/, ...) "
                                              "or the folder itself; rows name their images by absolute path.")]
Force = Annotated[bool, typer.Option("--force", help="Replace --out if it is a converted data directory.")]


def _report(out: Path, summary: dict) -> None:
    missing = f", {summary['images_missing']} of {summary['images']} images not found" \
        if summary.get("images_missing") else ""
    typer.echo(f"{summary['kind']}: {summary['rows']} rows{missing}; written to {out / 'data.jsonl'}")


def build_data_app(wrap) -> typer.Typer:
    """The ``data`` sub-app, its commands wrapped by ``wrap``."""
    data_app = typer.Typer(help="Data helpers: convert official annotation files into vpgtrans rows.",
                           no_args_is_help=True)
    convert_app = typer.Typer(help="Official annotation files -> a data directory any --data option reads "
                                   "(docs/data.md).", no_args_is_help=True)
    data_app.add_typer(convert_app, name="convert")

    @convert_app.command("coco-captions")
    @wrap
    def coco_captions(src: Annotated[Path, typer.Argument(help="captions_<split><year>.json, or Karpathy's "
                                                               "dataset_coco.json.")],
                      out: Out, image_root: ImageRoot,
                      split: Annotated[Optional[str], typer.Option(help="Karpathy: the split(s) to keep, comma-separated "
                                                                         "(train, restval, val, test; e.g. "
                                                                         "train,restval).")] = None,
                      rows: Annotated[Optional[str], typer.Option(help="caption: a row per caption (training); image: a "
                                                                       "row per image with all its captions (evaluation). "
                                                                       "Default: image for Karpathy val/test, else "
                                                                       "caption.")] = None,
                      force: Force = False):
        """COCO captions (official or Karpathy) -> caption rows."""
        from vpgtrans.data_convert import convert

        _report(*convert("coco-captions", src, out, image_root, split=split, rows=rows, force=force))

    @convert_app.command("vqav2")
    @wrap
    def vqav2(src: Annotated[Path, typer.Argument(help="v2_OpenEnded_mscoco_<subtype>_questions.json.")],
              out: Out, image_root: ImageRoot,
              annotations: Annotated[Optional[Path], typer.Option(help="v2_mscoco_<subtype>_annotations.json (default: "
                                                                       "beside SRC under its official name).")] = None,
              force: Force = False):
        """VQAv2 questions + annotations -> VQA rows (all ten answers, question_id, answer_type)."""
        from vpgtrans.data_convert import convert

        _report(*convert("vqav2", src, out, image_root, annotations=annotations, force=force))

    @convert_app.command("refcoco")
    @wrap
    def refcoco(src: Annotated[Path, typer.Argument(help="refs(unc).p, refs(google).p, refs(umd).p (a pickle of "
                                                         "plain lists and dicts; anything else is refused).")],
                out: Out, image_root: ImageRoot,
                split: Annotated[Optional[str], typer.Option(help="The split(s) to keep, comma-separated (train, val, "
                                                                   "testA, testB, test).")] = None,
                instances: Annotated[Optional[Path], typer.Option(help="instances.json (default: beside SRC).")] = None,
                force: Force = False):
        """RefCOCO / RefCOCO+ / RefCOCOg -> grounding rows (pixel boxes x1,y1,x2,y2; read with the default
        --bbox-format xyxy)."""
        from vpgtrans.data_convert import convert

        _report(*convert("refcoco", src, out, image_root, split=split, instances=instances, force=force))

    return data_app
