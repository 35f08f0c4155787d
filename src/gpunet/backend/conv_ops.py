"""The convolution and pooling ops of Ops (which inherits them), written once against `xp` like
the rest: im2col and one channel-major GEMM, its epilogue (bias, activation, and LeNet's ReLU then
max pool), and their backwards. CupyOps overrides the epilogues and im2col/col2im with kernels;
NumpyOps runs stride-1 convolutions over wide rows (see there).

In mixed precision (gpunet.backend.precision) every GEMM here takes its operands through the Ops'
gemm_operands: x and the weight rounded to the 16-bit format before im2col (which only gathers, so its
columns are rounded values too), dY and the weight in the backward; the columns are kept for the
backward in 16 bits (store_16bit: only dW's product reads them)."""
from __future__ import annotations


def pooled_size(size, kernel, stride, padding=(0, 0)):
    """Output (height, width) of a convolution or pooling window sliding over size."""
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, kernel, stride, padding))


class ConvOps:
    # ---------------------------------------------------------------- convolution
    def im2col(self, x, kernel, stride, padding):
        """(N, C, H, W) -> columns (N*OH*OW, C*kh*kw); rows in (n, oh, ow) order."""
        xp = self.xp
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        oh, ow = pooled_size((h, w), kernel, stride, padding)
        xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        cols = xp.empty((n, oh, ow, c, kh, kw), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                patch = xpad[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw]
                cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
        return cols.reshape(n * oh * ow, c * kh * kw)

    def col2im(self, cols, x_shape, kernel, stride, padding):
        """The adjoint of im2col: scatter-add columns back into an (N, C, H, W) array."""
        xp = self.xp
        n, c, h, w = x_shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        oh, ow = pooled_size((h, w), kernel, stride, padding)
        cols = cols.reshape(n, oh, ow, c, kh, kw)
        xpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
        for i in range(kh):
            for j in range(kw):
                xpad[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw] += cols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return xpad[:, :, ph : ph + h, pw : pw + w]

    def conv2d(self, x, weight, bias, stride, padding, activation=None):
        """NCHW convolution as im2col + one GEMM, then activation (relu, sigmoid, tanh or None);
        returns (y, cols) (cols feed the backward).

        The GEMM runs channel-major, (out, c*kh*kw) x (c*kh*kw, n*oh*ow), so that moving its result
        to NCHW copies runs of oh*ow contiguous values (the bias add and activation ride on that copy).
        """
        y_t, cols, (oh, ow) = self.conv_gemm(x, weight, stride, padding)
        return self.conv_epilogue(y_t, bias, activation).reshape(x.shape[0], weight.shape[0], oh, ow), cols

    def conv_gemm(self, x, weight, stride, padding):
        """(y_t, cols, (oh, ow)): the convolution's product channel-major, y_t (out, N, oh * ow); cols as
        kept for the backward (16-bit in mixed precision)."""
        n, out_c = x.shape[0], weight.shape[0]
        oh, ow = pooled_size(x.shape[2:], weight.shape[2:], stride, padding)
        x, weight = self.gemm_operands(x, weight)
        cols = self.im2col(x, weight.shape[2:], stride, padding)
        y_t = self.xp.matmul(weight.reshape(out_c, -1), cols.T).reshape(out_c, n, oh * ow)
        return y_t, self.store_16bit(cols), (oh, ow)

    def conv_epilogue(self, y_t, bias, activation):
        """(N, C, ...) = activation(y_t (C, N, ...) moved to NCHW, + bias (C))."""
        out_c, n, *spatial = y_t.shape
        out = self.xp.empty((n, out_c, *spatial), dtype=y_t.dtype)
        if bias is None:
            out[...] = y_t.swapaxes(0, 1)
        else:
            self.xp.add(y_t.swapaxes(0, 1), bias.reshape(1, out_c, *[1] * len(spatial)), out=out)
        return out if activation is None else self.activation(activation, out, out=out)

    def conv2d_backward(self, dy, cols, x_shape, weight, grad_weight, grad_bias, stride, padding, need_dx=True,
                        activation=None, y=None):
        """Writes dW = dZ^T cols and db = sum dZ for dZ = dy * activation'(y) (y: the forward's
        output, with an activation); returns dX = col2im(dZ W)."""
        dy_t = self.conv_bias_act_backward(dy, y, activation, grad_bias)  # channel-major, as in the forward GEMM
        return self._conv_gemms_backward(dy_t, cols, x_shape, weight, grad_weight, stride, padding, need_dx)

    def _conv_gemms_backward(self, dy_t, cols, x_shape, weight, grad_weight, stride, padding, need_dx):
        """dW = dY^T cols into grad_weight; dX = col2im(dY W) (or None) from the channel-major dY (C, N * L).
        (The bias gradient was summed from dY itself, in float32, before.)"""
        out_c = weight.shape[0]
        dy_t, cols, w = self.gemm_operands(dy_t, cols, weight if need_dx else None)
        self.xp.matmul(dy_t, cols, out=grad_weight.reshape(out_c, -1))
        if not need_dx:
            return None
        dcols = self.xp.matmul(w.reshape(out_c, -1).T, dy_t).T  # = dY W, laid out as im2col lays out its columns
        return self.col2im(dcols, x_shape, weight.shape[2:], stride, padding)

    def conv2d_relu_pool(self, x, weight, bias, stride, padding, pool):
        """max_pool(relu(conv2d(x))) over non-overlapping pool x pool windows: (pooled, argmax, cols,
        the conv output's shape), what conv2d_relu_pool_backward takes."""
        y, cols = self.conv2d(x, weight, bias, stride, padding, "relu")
        pooled, argmax = self.max_pool(y, pool, pool)
        return pooled, argmax, cols, y.shape

    def conv2d_relu_pool_backward(self, dp, pooled, argmax, cols, x_shape, y_shape, weight, grad_weight, grad_bias,
                                  stride, padding, pool, need_dx=True):
        """The backward of conv2d_relu_pool: each window's gradient goes to its maximum where that was
        positive (relu'(y) at the maximum is pooled > 0), then as conv2d_backward."""
        dy = self.max_pool_backward(dp * (pooled > 0), argmax, y_shape, pool, pool)
        return self.conv2d_backward(dy, cols, x_shape, weight, grad_weight, grad_bias, stride, padding, need_dx)

    def conv_bias_act_backward(self, dy, y, activation, grad_bias):
        """dZ = dy * activation'(y) as (C, N * L), channel-major; writes sum dZ per channel into grad_bias."""
        dz = self._conv_dz(dy, y, activation, grad_bias)
        return dz.transpose(1, 0, 2, 3).reshape(dz.shape[1], -1)

    def _conv_dz(self, dy, y, activation, grad_bias):
        """dZ = dy * activation'(y), NCHW; writes sum dZ per channel into grad_bias. y may be kept in 16 bits."""
        y = self.stored_float32(y)
        if activation is not None:
            dy = self.activation_backward(activation, y, y, dy)  # relu'(z) = relu'(y); sigmoid', tanh' read y
        if grad_bias is not None:
            self.xp.sum(dy, axis=(0, 2, 3), out=grad_bias)
        return dy

    # ---------------------------------------------------------------- pooling (through im2col)
    def max_pool(self, x, kernel, stride):
        """(N, C, H, W) -> (y, argmax within each window); ties go to the first, as in torch."""
        n, c, h, w = x.shape
        cols = self.im2col(x.reshape(n * c, 1, h, w), kernel, stride, (0, 0))
        arg = cols.argmax(axis=1)
        y = cols[self.xp.arange(len(arg)), arg]
        return y.reshape(n, c, *pooled_size((h, w), kernel, stride)), arg

    def max_pool_backward(self, dy, argmax, x_shape, kernel, stride):
        n, c, h, w = x_shape
        cols = self.xp.zeros((argmax.size, kernel[0] * kernel[1]), dtype=dy.dtype)
        cols[self.xp.arange(argmax.size), argmax.reshape(-1)] = dy.reshape(-1)  # any backend's argmax layout
        return self.col2im(cols, (n * c, 1, h, w), kernel, stride, (0, 0)).reshape(x_shape)

    def avg_pool(self, x, kernel, stride):
        n, c, h, w = x.shape
        cols = self.im2col(x.reshape(n * c, 1, h, w), kernel, stride, (0, 0))
        return cols.mean(axis=1).reshape(n, c, *pooled_size((h, w), kernel, stride))

    def avg_pool_backward(self, dy, x_shape, kernel, stride):
        n, c, h, w = x_shape
        area = kernel[0] * kernel[1]
        cols = self.xp.repeat(dy.reshape(-1, 1) * (1.0 / area), area, axis=1).astype(dy.dtype, copy=False)
        return self.col2im(cols, (n * c, 1, h, w), kernel, stride, (0, 0)).reshape(x_shape)

