"""The models shipped with omnimask: ``manifest.json`` and the files it lists (installed as
``omnimask.zoo.shipped``; ``omnimask zoo list`` shows them)."""
