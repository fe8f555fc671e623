"""Write ``prompts.txt``: the project's calibration prompt set (written for asdm-export, Apache-2.0).

Each line is one subject in one setting in one style. The three lists are ours; the combination is a
fixed walk (no randomness) that pairs every subject with four settings and four styles, so the set spreads
over the kinds of prompts Stable Diffusion users write: photos, paintings, renders, portraits,
landscapes, objects, animals, interiors, food. Run ``python calibration/make_prompts.py`` to re-create it.
"""

from pathlib import Path

SUBJECTS = [
    "a red fox", "an old lighthouse", "a bowl of ramen", "a vintage bicycle", "a snow leopard", "a glass teapot",
    "a medieval castle", "a hummingbird", "a sailing ship", "a steam locomotive", "a golden retriever puppy",
    "a cup of cappuccino", "an astronaut", "a bonsai tree", "a wooden cabin", "a koi fish", "a city skyline",
    "a field of sunflowers", "a robot gardener", "an elderly fisherman", "a ballet dancer", "a stack of books",
    "a mountain lake", "a desert canyon", "a street market", "a jellyfish", "a red sports car", "a tabby cat",
    "a waterfall", "a cherry blossom tree", "a chess board", "a violin", "a hot air balloon", "a knight in armor",
    "a bowl of fresh fruit", "a foggy forest", "a lion", "an owl", "a tiny house", "a neon-lit alley",
    "a child flying a kite", "a vintage typewriter", "a plate of sushi", "a windmill", "an elephant",
    "a spiral staircase", "a lavender field", "a coral reef", "a motorcycle", "a pair of sneakers",
    "a wizard", "a cottage garden", "a polar bear", "a train station", "a chocolate cake", "a hiking trail",
    "a samurai", "a greenhouse", "a jazz musician", "a dragon", "a parrot", "a rainy street", "a bridge",
    "a lighthouse keeper", "a deer in a meadow", "a modern kitchen", "a bowl of soup", "a pirate ship",
    "a clock tower", "a farmer", "a mushroom", "a submarine", "a reading nook", "a fire truck", "a butterfly",
    "a temple", "a skateboarder", "a panda", "a crystal", "a lantern", "a ceramic vase", "a horse",
]

SETTINGS = [
    "at sunset", "in the rain", "on a snowy morning", "under a starry sky", "in golden hour light",
    "on a beach", "in a busy city", "in a quiet village", "at night", "in a misty valley", "in spring",
    "in autumn", "on a white background", "in a cozy room", "by the sea", "in the mountains",
]

STYLES = [
    "photograph, 35mm, high detail", "oil painting", "watercolor", "digital art, trending on artstation",
    "studio photo, soft lighting", "pencil sketch", "3d render, octane", "anime style",
    "cinematic, dramatic lighting", "impressionist painting", "low poly art", "macro photograph",
    "children's book illustration", "vintage postcard", "isometric illustration", "ukiyo-e woodblock print",
]


def prompts() -> list[str]:
    out = []
    for i, subject in enumerate(SUBJECTS):
        for j in range(4):
            setting = SETTINGS[(3 * i + 7 * j) % len(SETTINGS)]
            style = STYLES[(5 * i + 3 * j + i // len(STYLES)) % len(STYLES)]
            out.append(f"{subject} {setting}, {style}")
    return out


if __name__ == "__main__":
    lines = prompts()
    assert len(set(lines)) == len(lines) >= 256
    (Path(__file__).parent / "prompts.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} prompts")
