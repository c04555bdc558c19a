/*
 * Segment cells with mmcs-monai from QuPath 0.5 and later, and import them as detection objects.
 *
 * Automate > Script editor > File > Open... this file > Run (or Run for project). For the current image it:
 *   1. exports the selected annotation's bounding region (the whole image when nothing is selected) as an
 *      OME-TIFF, with QuPath's pixel size, into a temporary folder;
 *   2. runs `mmcs infer <folder> <out> --formats geojson` (diameter, channels and model from the settings below);
 *   3. reads `<out>/region_cells.geojson` (PathIO.readObjects), moves the cells from the region's pixels to the
 *      image's, keeps those inside the selected annotation and adds them to it (else to the image).
 * Each cell is a detection with the measurements mmcs wrote (area and diameter in px and µm, mean intensity
 * per channel). Nothing is sent over a network: mmcs runs on this computer (docs/qupath.md).
 */

import java.awt.geom.AffineTransform
import java.nio.file.Files
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObjectTools
import qupath.lib.regions.RegionRequest

// ---- settings ---------------------------------------------------------------------------------------------
// the mmcs command: $MMCS, else the default environment of scripts/setup_env.sh
def MMCS = System.getenv("MMCS") ?: System.getProperty("user.home") + "/.venvs/mmcs/bin/mmcs"
def DIAMETER = "auto"       // "auto", pixels ("17"), or micrometres ("8um": uses the image's pixel size)
def CHANNELS = ""           // "" (all, averaged), or by name / index: "DAPI", "cyto,DAPI", "0,2"
def MODEL = ""              // "" for the shipped model, or a checkpoint / exported .ts file
def DOWNSAMPLE = 1.0        // 1 = full resolution; cells are segmented at this scale
def MAX_PIXELS = 50_000_000 // larger regions: use `mmcs infer-slide slide.ome.tif out --formats geojson` instead
// ------------------------------------------------------------------------------------------------------------

def imageData = getCurrentImageData()
if (imageData == null) {
    println "mmcs: open an image first"
    return
}
def server = imageData.getServer()
def parent = getSelectedObject()
if (parent != null && !parent.isAnnotation())
    parent = null
def request = parent != null ?
        RegionRequest.createInstance(server.getPath(), DOWNSAMPLE, parent.getROI()) :
        RegionRequest.createInstance(server, DOWNSAMPLE)
double pixels = (request.getWidth() / DOWNSAMPLE) * (request.getHeight() / DOWNSAMPLE)
if (pixels > MAX_PIXELS) {
    println "mmcs: the region has ${(long) pixels} pixels, more than ${MAX_PIXELS}: select a smaller annotation, raise DOWNSAMPLE, or run mmcs infer-slide"
    return
}

def folder = Files.createTempDirectory("mmcs-qupath")
def input = folder.resolve("in")
def output = folder.resolve("out")
Files.createDirectories(input)
writeImageRegion(server, request, input.resolve("region.ome.tif").toString())  // OME-TIFF: pixel size and channel names

def command = [MMCS, "infer", input.toString(), output.toString(), "--formats", "geojson", "--overlay", "False", "--diameter", DIAMETER]
if (CHANNELS)
    command += ["--channels", CHANNELS]
if (MODEL)
    command += ["--model", MODEL]
println "mmcs: " + command.join(" ")
def process = new ProcessBuilder(command).redirectErrorStream(true).start()
process.inputStream.eachLine { println it }
if (process.waitFor() != 0) {
    println "mmcs: failed (the line above says why)"
    return
}

def cells = PathIO.readObjects(output.resolve("region_cells.geojson"))
// region pixels -> image pixels: scale by the downsample, then move to the region's corner
def transform = AffineTransform.getTranslateInstance(request.getX(), request.getY())
transform.scale(DOWNSAMPLE, DOWNSAMPLE)
def placed = cells.collect { PathObjectTools.transformObject(it, transform, true) }
if (parent != null) {
    def area = parent.getROI().getGeometry()
    placed = placed.findAll { area.covers(it.getROI().getGeometry().getCentroid()) }
    parent.addChildObjects(placed)
    fireHierarchyUpdate()
} else {
    addObjects(placed)
}
println "mmcs: ${placed.size()} cells imported" + (parent != null ? " into ${parent}" : "")
folder.toFile().deleteDir()
