/* Decode only a region of a JPEG, at a DCT scale, with libjpeg-turbo's partial decoding.
 *
 * A RandomResizedCrop keeps on average ~40% of the image. libjpeg-turbo can skip the work outside it:
 * rows below the crop are never entropy-decoded (we stop reading), rows above it are entropy-decoded
 * but not inverse-transformed or colour-converted (jpeg_skip_scanlines), and columns outside it are
 * neither (jpeg_crop_scanline, widened to whole iMCUs). The TurboJPEG API that FFCV uses offers none of
 * this before libjpeg-turbo 3.0, hence this small file against the libjpeg API.
 *
 * Called from numba code through ctypes (as FFCV calls its own C), so it is built as a plain shared
 * library; the PyInit stub only lets setuptools build it as an extension module.
 */
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

struct error_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void on_error(j_common_ptr cinfo) {
    longjmp(((struct error_mgr *)cinfo->err)->jump, 1);
}

static void on_message(j_common_ptr cinfo) { (void)cinfo; } /* warnings (e.g. corrupt data) are not fatal */

/* Decode rows [y0, y1) and columns [x0, x1) of the image scaled by scale_num/8 (coordinates in the
 * scaled image) into out, RGB, row stride out_stride bytes. libjpeg widens the columns to iMCU
 * boundaries: the first decoded column is written to info[0], the decoded width to info[1], so the
 * caller finds column x0 at out + (x0 - info[0]) * 3. The scaled image size goes to info[2], info[3]
 * (height, width). out holds (y1 - y0) rows of out_stride bytes, at least 3 * info[1] (3 * the scaled
 * image width always suffices).
 * Returns 0, or -1 for a corrupt JPEG or a bad region. */
int decode_region(const unsigned char *data, unsigned long size, int scale_num,
                  int y0, int y1, int x0, int x1, unsigned char *out, long out_stride, int *info) {
    struct jpeg_decompress_struct cinfo;
    struct error_mgr err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.output_message = on_message;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_IFAST; /* what FFCV's decoder uses (TJFLAG_FASTDCT) */
    cinfo.scale_num = scale_num;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);
    info[2] = cinfo.output_height;
    info[3] = cinfo.output_width;
    if (y0 < 0 || y1 > (int)cinfo.output_height || y0 >= y1 || x0 < 0 || x1 > (int)cinfo.output_width
        || x0 >= x1) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    JDIMENSION xoffset = x0, width = x1 - x0;
    if (width < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &xoffset, &width);
    info[0] = xoffset;
    info[1] = width;
    if ((long)width * 3 > out_stride) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (y0 > 0)
        jpeg_skip_scanlines(&cinfo, y0);
    while ((int)cinfo.output_scanline < y1) {
        JSAMPROW row = out + (long)(cinfo.output_scanline - y0) * out_stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_abort_decompress(&cinfo); /* the rows below the region are never decoded */
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* The crop decoder's random key for its next batch (crop_decoder.py): state[0] (seed, rank, epoch; set before an
   epoch) mixed with the batch's number state[1], which it advances. FFCV's loader thread runs one batch at a time,
   so the n-th call of an epoch always gets the n-th batch's key. */
static unsigned long long splitmix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

unsigned long long next_batch_key(unsigned long long *state) {
    return splitmix64(state[0] ^ splitmix64(state[1]++));
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
