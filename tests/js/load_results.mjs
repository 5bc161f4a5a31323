// Loads an SR (and optionally a SEG) onto its source images the way OHIF does, with
// dcmjs and the Cornerstone3D adapters, headless in Node, and prints what they found
// as JSON on stdout.
//
// Usage: node load_results.mjs CASE.json
//   CASE.json = {"sr": "sr.dcm", "seg": "seg.dcm" | null, "images": ["img1.dcm", ...]}
//
// Output: {"measurements": [{toolType, sopInstanceUID, imageIndex, finding,
//   findingSites, trackingUID, imagePoints: [[col, row], ...]}],
//   "warnings": [...], "seg": {segments: {n: {slices: {imageIndex: voxels}}}} | null}
//
// Image coordinates are Cornerstone's (pixel centre at +0.5), converted back from
// the world coordinates the adapters produce, so the caller can compare them with
// the pixels the model marked.
import fs from "node:fs";

// The adapters log failures (one per measurement group they cannot load) to the
// console; collect them for the caller and keep stdout for the JSON answer. The
// libraries bind console methods at import time, so they are imported after this.
const warnings = [];
for (const level of ["log", "info", "warn", "error", "debug"]) {
  console[level] = (...args) => {
    if (level === "warn" || level === "error") {
      warnings.push(args.map((a) => (a instanceof Error ? a.message : typeof a === "string" ? a : "")).join(" ").trim());
    }
  };
}
const dcmjs = await import("dcmjs");
const { metaData, utilities } = await import("@cornerstonejs/core");
const { adaptersSR, adaptersSEG } = await import("@cornerstonejs/adapters");

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function readDataset(path) {
  const buf = fs.readFileSync(path);
  const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const dicom = DicomMessage.readFile(ab);
  const ds = DicomMetaDictionary.naturalizeDataset(dicom.dict);
  ds._meta = DicomMetaDictionary.namifyDataset(dicom.meta);
  return { ds, arrayBuffer: ab };
}

const asArray = (v) => (v === undefined || v === null ? [] : Array.isArray(v) ? v : [v]);
const num = (v) => asArray(v).map(Number);

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));

// One imageId per source file; metadata served by a provider, as OHIF's
// DicomMetadataStore does for the images it has loaded.
const images = new Map();
const imageIds = spec.images.map((path, i) => {
  const imageId = `dicomfile:${i}`;
  images.set(imageId, readDataset(path).ds);
  return imageId;
});

function planeModule(ds) {
  const iop = num(ds.ImageOrientationPatient);
  const ipp = num(ds.ImagePositionPatient);
  const spacing = num(ds.PixelSpacing).length ? num(ds.PixelSpacing) : num(ds.ImagerPixelSpacing);
  const rowCosines = iop.length === 6 ? iop.slice(0, 3) : [1, 0, 0];
  const columnCosines = iop.length === 6 ? iop.slice(3, 6) : [0, 1, 0];
  return {
    frameOfReferenceUID: ds.FrameOfReferenceUID,
    rows: ds.Rows,
    columns: ds.Columns,
    imageOrientationPatient: [...rowCosines, ...columnCosines],
    rowCosines,
    columnCosines,
    imagePositionPatient: ipp.length === 3 ? ipp : [0, 0, 0],
    sliceThickness: ds.SliceThickness,
    // Cornerstone: rowPixelSpacing is the distance between rows (PixelSpacing[0]).
    rowPixelSpacing: spacing.length ? spacing[0] : 1,
    columnPixelSpacing: spacing.length ? spacing[1] : 1,
    pixelSpacing: spacing.length ? spacing : [1, 1],
    usingDefaultValues: iop.length !== 6,
  };
}

metaData.addProvider((type, imageId) => {
  const ds = images.get(imageId);
  if (!ds) return undefined;
  switch (type) {
    case "imagePlaneModule":
      return planeModule(ds);
    case "generalImageModule":
      return { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: ds.InstanceNumber };
    case "sopCommonModule":
      return { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID };
    case "generalSeriesModule":
      return { modality: ds.Modality, seriesInstanceUID: ds.SeriesInstanceUID };
    case "imagePixelModule":
      return {
        samplesPerPixel: ds.SamplesPerPixel,
        photometricInterpretation: ds.PhotometricInterpretation,
        rows: ds.Rows,
        columns: ds.Columns,
        bitsAllocated: ds.BitsAllocated,
        bitsStored: ds.BitsStored,
        highBit: ds.HighBit,
        pixelRepresentation: ds.PixelRepresentation,
      };
    case "instance":
      return ds;
    default:
      return undefined;
  }
}, 10000);

const uidToImageId = {};
const imageIndex = {};
imageIds.forEach((imageId, i) => {
  const ds = images.get(imageId);
  uidToImageId[`${ds.SOPInstanceUID}:1`] = imageId;
  imageIndex[imageId] = i;
});

// --- SR: MeasurementReport.generateToolState, as OHIF's SR hydration calls it ---------
const { ds: sr } = readDataset(spec.sr);
const toolState = adaptersSR.Cornerstone3D.MeasurementReport.generateToolState(
  sr,
  uidToImageId,
  metaData,
);
const measurements = [];
for (const [toolType, list] of Object.entries(toolState)) {
  for (const m of list) {
    const imageId = m.annotation?.metadata?.referencedImageId;
    const data = m.annotation?.data ?? {};
    const world = data.contour?.polyline ?? data.handles?.points ?? [];
    measurements.push({
      toolType,
      sopInstanceUID: m.sopInstanceUid ?? null,
      imageIndex: imageId === undefined ? null : imageIndex[imageId],
      finding: m.finding?.CodeMeaning ?? null,
      findingSites: asArray(m.findingSites).map((s) => s.CodeMeaning),
      description: m.description ?? null,
      trackingUID: m.TrackingUniqueIdentifier ?? null,
      imagePoints: imageId ? world.map((p) => utilities.worldToImageCoords(imageId, p)) : [],
    });
  }
}

// --- SEG: the Cornerstone3D segmentation adapter, onto the source stack --------------
let seg = null;
if (spec.seg) {
  const { arrayBuffer } = readDataset(spec.seg);
  const out = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds,
    arrayBuffer,
    { metadataProvider: metaData },
  );
  const segments = {};
  out.labelMapImages.flat().forEach((image, i) => {
    const px = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
    const counts = {};
    for (const v of px) if (v) counts[v] = (counts[v] ?? 0) + 1;
    const index = imageIndex[image.referencedImageId] ?? i;
    for (const [label, n] of Object.entries(counts)) {
      segments[label] ??= { slices: {} };
      segments[label].slices[index] = n;
    }
  });
  seg = {
    segments,
    labels: Object.keys(out.segMetadata?.data ?? {}).filter((k) => out.segMetadata.data[k]),
  };
}

process.stdout.write(JSON.stringify({ measurements, warnings, seg }) + "\n");
