"""``switchdit prepare {digits,imagefolder,npy,manifest}``: write WebDataset shards of latents."""

from __future__ import annotations

import argparse


def _add_digits(sub) -> None:
    p = sub.add_parser("digits", help="scikit-learn's 1,797 handwritten digits as 1-channel 'latents'")
    p.add_argument("--out", required=True, help="output folder (validation split goes to OUT/val/)")
    p.add_argument("--shards", type=int, default=8, help="number of training shards (default 8)")
    p.add_argument("--size", type=int, default=16, help="upsampled side length (default 16)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="fraction held out as a validation split in OUT/val/ (default 0)",
    )


def _add_imagefolder(sub) -> None:
    p = sub.add_parser("imagefolder", help="encode an ImageFolder tree (one folder per class) with a VAE")
    p.add_argument("--src", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--vae", required=True, help="local folder of a diffusers AutoencoderKL (save_pretrained)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--resolution", type=int, default=256, help="image side after the centre crop (256 or 512)"
    )
    p.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of each image")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    p.add_argument("--workers", type=int, default=0, help="processes decoding images (0 = this process)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored latent dtype")
    p.add_argument(
        "--sample-posterior",
        action="store_true",
        help="store a seeded sample of the posterior instead of its mean",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --sample-posterior")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")


def _add_npy(sub) -> None:
    p = sub.add_parser("npy", help="repack a folder of precomputed .npy latents into shards")
    p.add_argument("--src", required=True, help="folder of .npy files ([C,H,W] or [N,C,H,W] each)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--labels",
        default="",
        help="labels: a folder of .npy files named like the features, or a .json mapping "
        "file name -> label(s); default: class subfolders of --src",
    )
    p.add_argument(
        "--num-classes", type=int, default=0, help="number of classes (default: largest label + 1)"
    )
    p.add_argument(
        "--scale-factor",
        type=float,
        default=1.0,
        help="the factor the stored latents were already multiplied by (recorded, not applied)",
    )
    p.add_argument("--vae", default="unknown", help="name of the VAE that made the latents (recorded)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--dtype", choices=("keep", "float16", "float32"), default="keep", help="stored latent dtype"
    )


def _add_manifest(sub) -> None:
    p = sub.add_parser("manifest", help="write manifest.json for existing shards (e.g. from wds.ShardWriter)")
    p.add_argument("--shards", required=True, help="local shards: brace pattern or folder")
    p.add_argument(
        "--num-classes", type=int, default=0, help="number of classes (default: largest class + 1)"
    )
    p.add_argument(
        "--scale-factor", type=float, default=1.0, help="scale factor the latents carry (recorded)"
    )
    p.add_argument("--vae", default="unknown", help="name of the VAE that made the latents (recorded)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE")
    sub.required = True
    _add_digits(sub)
    _add_imagefolder(sub)
    _add_npy(sub)
    _add_manifest(sub)


def run(args: argparse.Namespace) -> int:
    if args.source == "digits":
        from switchdit_dist.data.writers.digits import write_digits

        write_digits(args.out, shards=args.shards, size=args.size, val_fraction=args.val_fraction)
    elif args.source == "imagefolder":
        from switchdit_dist.data.writers.imagefolder import ImageFolderOptions, write_imagefolder

        write_imagefolder(
            ImageFolderOptions(
                src=args.src,
                vae=args.vae,
                out=args.out,
                resolution=args.resolution,
                flip=args.flip,
                batch_size=args.batch_size,
                workers=args.workers,
                samples_per_shard=args.samples_per_shard,
                dtype=args.dtype,
                sample_posterior=args.sample_posterior,
                seed=args.seed,
                device=args.device,
            )
        )
    elif args.source == "npy":
        from switchdit_dist.data.writers.npyfolder import NpyOptions, write_npy_folder

        write_npy_folder(
            NpyOptions(
                src=args.src,
                out=args.out,
                labels=args.labels,
                num_classes=args.num_classes,
                scale_factor=args.scale_factor,
                vae=args.vae,
                samples_per_shard=args.samples_per_shard,
                dtype=args.dtype,
            )
        )
    else:
        from switchdit_dist.data.writers.index import write_manifest_for

        write_manifest_for(
            args.shards, num_classes=args.num_classes, scale_factor=args.scale_factor, vae=args.vae
        )
    return 0
